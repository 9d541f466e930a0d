//! Build a GateSvr upstream: implement [`Handler`], serve [`Upstream`]'s
//! services, and push or broadcast to clients with [`Upstream::push`] and
//! [`Upstream::broadcast`].
//!
//! [`Upstream`] serves both contracts of docs/protocol.md: the streaming one
//! (§14, `UpstreamStreamService.Open`: data-plane nodes dial in and keep one
//! stream each) and the unary one (§13, `UpstreamService.ProcessRequest` and
//! `GetStatus`), with the same handler, so the data plane may use either.
//! Pushes travel on a connected data-plane stream (any one: the receiving
//! node routes each push to the node that owns the session).
//!
//! What it does for you: request windows (a request beyond
//! `max_requests_in_flight` is answered `not_executed`, never queued),
//! deadlines (`timeout_ms`) and cancellation (a cancelled request's handler
//! future is dropped), the push window the node announced, in-band health
//! ([`Upstream::set_serving`]) and a drain that answers everything received
//! before the streams end ([`Upstream::drain`]). It does not do TLS, auth or
//! registration: add those on your `tonic` server (see `gate-upstream`).
//!
//! # Layout
//! - `lib.rs`: [`Handler`], [`Reply`], [`Options`], [`Upstream`] and its unary service.
//! - `stream`: one data-plane stream: reading requests, writing answers, pushes.
//!
//! ```text
//!  data-plane node ──Open(GatewayFrame…)──▶ Upstream ──request──▶ Handler::handle
//!        ▲                                     │ ◀──Reply────────────┘
//!        └──────────── UpstreamFrame… ◀────────┘ response / push / broadcast / health / drain
//! ```

#![forbid(unsafe_code)]

mod stream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use gatesvr_proto::upstream::upstream_service_server::{UpstreamService, UpstreamServiceServer};
use gatesvr_proto::upstream::upstream_stream_service_server::UpstreamStreamServiceServer;
use gatesvr_proto::upstream::{
    BroadcastRequest, BroadcastResponse, GetStatusRequest, ProcessRequestRequest,
    ProcessRequestResponse, PushResult, PushToClientRequest, UpstreamStatus,
};
use parking_lot::Mutex;

pub use gatesvr_proto::upstream as proto;

/// What a handler answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The request was executed; `app_code` says whether it succeeded.
    Done(ProcessRequestResponse),
    /// The request was NOT executed (overloaded, not ready). The data plane
    /// tries another instance or tells the client to retry the same seq.
    NotExecuted {
        /// Suggested client back-off, milliseconds (0 = the node's default).
        retry_after_ms: u32,
    },
}

/// The application: answers one client request.
pub trait Handler: Send + Sync + 'static {
    /// Runs one request. Dropped (cancelled) when the data plane gives up on
    /// it; an answer after that is discarded.
    ///
    /// On the streaming contract the future is first polled on the reader of
    /// the node's stream, and moved to a task of its own only if it waits: a
    /// handler that answers at once costs no task. Work done before the first
    /// `.await` therefore delays the stream's next requests; a handler that
    /// computes for long should start with `tokio::task::yield_now().await`
    /// (or use `spawn_blocking`), so that it runs on its own task.
    fn handle(&self, request: ProcessRequestRequest) -> impl Future<Output = Reply> + Send;
}

/// Settings of an [`Upstream`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Reported in hellos and `GetStatus`.
    pub service_name: String,
    /// The zone this instance serves.
    pub zone: String,
    /// Requests one data-plane node may have outstanding on its stream; told
    /// in the hello. Default 256.
    pub max_requests_in_flight: u32,
}

impl Options {
    /// Options for `service_name` in `zone`, with the defaults.
    pub fn new(service_name: impl Into<String>, zone: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            zone: zone.into(),
            max_requests_in_flight: 256,
        }
    }
}

/// Why a push or broadcast did not get a result.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// No data-plane node has a stream open to this instance: nothing sent.
    #[error("no data-plane stream is connected")]
    NoStream,
    /// The stream ended after the push was sent: it may have been queued.
    #[error("the stream ended before the push's result arrived; it may have been queued")]
    Lost,
    /// The gateway refused it (gRPC status code and message, as `PushToClient`).
    #[error("refused by the gateway: code {code}: {message}")]
    Refused {
        /// gRPC status code.
        code: i32,
        /// The gateway's message.
        message: String,
    },
}

/// A served upstream. Cheap to clone; every clone is the same instance.
pub struct Upstream<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for Upstream<H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Pushes and broadcasts through whichever data-plane streams are open.
/// Cheap to clone; independent of the handler's type, so a handler can hold
/// one (see `gate-upstream`).
#[derive(Clone, Default)]
pub struct Pusher {
    streams: Arc<Streams>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("streams", &self.streams())
            .finish()
    }
}

#[derive(Default)]
pub(crate) struct Streams {
    pub(crate) open: Mutex<Vec<Arc<stream::Stream>>>,
    next: AtomicUsize,
}

impl Pusher {
    /// Data-plane streams open now: 0 means a push would fail with
    /// [`PushError::NoStream`] (use `GatewayService` then).
    pub fn streams(&self) -> usize {
        self.streams.open.lock().len()
    }

    /// Queues one push through a connected data-plane node.
    pub async fn push(&self, push: PushToClientRequest) -> Result<PushResult, PushError> {
        let stream = self.pick().ok_or(PushError::NoStream)?;
        stream.push(push).await
    }

    /// Queues one broadcast through a connected data-plane node (which fans
    /// it out to every node).
    pub async fn broadcast(
        &self,
        broadcast: BroadcastRequest,
    ) -> Result<BroadcastResponse, PushError> {
        let stream = self.pick().ok_or(PushError::NoStream)?;
        stream.broadcast(broadcast).await
    }

    /// Queues many pushes through one connected data-plane node, in order
    /// (order per session is the order given), as `push_batch` frames
    /// (docs/protocol.md §14.2): one frame and one result frame per up to
    /// the node's `max_push_batch` pushes instead of one each. One
    /// [`PushResult`] per push, in order (code 0 = queued, else the gRPC
    /// code `PushToClient` would return; UNKNOWN: its stream ended before
    /// the result, it may have been queued; UNAVAILABLE: not sent).
    pub async fn push_batch(
        &self,
        pushes: Vec<PushToClientRequest>,
    ) -> Result<Vec<PushResult>, PushError> {
        self.batch(pushes, false).await
    }

    /// As [`push_batch`](Self::push_batch), asking the node for codes only
    /// (`StreamPushBatch.codes_only`): a queued push's result is its code 0
    /// alone (no `seq_id`, `session_id` or `node_id`); a refused push's is
    /// full. Less to encode on the node and to decode here, for callers that
    /// only need to know which pushes were refused.
    pub async fn push_batch_codes(
        &self,
        pushes: Vec<PushToClientRequest>,
    ) -> Result<Vec<PushResult>, PushError> {
        self.batch(pushes, true).await
    }

    async fn batch(
        &self,
        pushes: Vec<PushToClientRequest>,
        codes_only: bool,
    ) -> Result<Vec<PushResult>, PushError> {
        let stream = self.pick().ok_or(PushError::NoStream)?;
        Ok(stream.push_batch(pushes, codes_only).await)
    }

    /// A live stream, round robin.
    fn pick(&self) -> Option<Arc<stream::Stream>> {
        let streams = self.streams.open.lock();
        if streams.is_empty() {
            return None;
        }
        let i = self.streams.next.fetch_add(1, Ordering::Relaxed) % streams.len();
        Some(streams[i].clone())
    }
}

pub(crate) struct Inner<H> {
    pub(crate) handler: H,
    pub(crate) opts: Options,
    pub(crate) serving: AtomicBool,
    pub(crate) draining: AtomicBool,
    pub(crate) streams: Arc<Streams>,
    pub(crate) requests_total: AtomicU64,
    pub(crate) inflight: AtomicU32,
    /// Woken whenever a request finishes (drain waits on it).
    pub(crate) idle: tokio::sync::Notify,
}

impl<H: Handler> Upstream<H> {
    /// An instance running `handler`; not serving until [`set_serving`](Self::set_serving).
    pub fn new(handler: H, opts: Options) -> Self {
        Self::with_pusher(handler, opts, Pusher::default())
    }

    /// As [`new`](Self::new), with streams shared with `pusher` (made before
    /// the handler, so the handler can hold it).
    pub fn with_pusher(handler: H, opts: Options, pusher: Pusher) -> Self {
        Self {
            inner: Arc::new(Inner {
                handler,
                opts,
                serving: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                streams: pusher.streams,
                requests_total: AtomicU64::new(0),
                inflight: AtomicU32::new(0),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// The streaming contract's service, to add to a `tonic` server.
    pub fn stream_service(&self) -> UpstreamStreamServiceServer<stream::StreamService<H>> {
        UpstreamStreamServiceServer::new(stream::StreamService {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// The unary contract's service (`ProcessRequest`, `GetStatus`), same handler.
    pub fn unary_service(&self) -> UpstreamServiceServer<Unary<H>> {
        UpstreamServiceServer::new(Unary {
            inner: self.inner.clone(),
        })
        .max_decoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gatesvr_proto::limits::MAX_MESSAGE_BYTES)
    }

    /// Takes the instance in or out of rotation: told in-band on every
    /// stream, and reported by `GetStatus`.
    pub fn set_serving(&self, serving: bool) {
        self.inner.serving.store(serving, Ordering::SeqCst);
        for s in self.inner.streams.open.lock().iter() {
            s.send_health(serving);
        }
    }

    /// Data-plane streams open now.
    pub fn streams(&self) -> usize {
        self.pusher().streams()
    }

    /// A handle for pushing through this instance's streams.
    pub fn pusher(&self) -> Pusher {
        Pusher {
            streams: self.inner.streams.clone(),
        }
    }

    /// Requests executing now, over every stream and unary call.
    pub fn inflight(&self) -> u32 {
        self.inner.inflight.load(Ordering::SeqCst)
    }

    /// Goes away cleanly (rolling upgrade): stops taking requests, tells
    /// every node (`Drain`), answers every request already received (new
    /// ones are answered `not_executed`), then ends the streams.
    pub async fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.set_serving(false);
        let streams: Vec<_> = self.inner.streams.open.lock().clone();
        for s in &streams {
            s.send_drain();
        }
        loop {
            let idle = self.inner.idle.notified();
            if self.inner.inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
        for s in &streams {
            s.end();
        }
    }

    /// Queues one push through a connected data-plane node.
    pub async fn push(&self, push: PushToClientRequest) -> Result<PushResult, PushError> {
        self.pusher().push(push).await
    }

    /// Queues one broadcast through a connected data-plane node.
    pub async fn broadcast(
        &self,
        broadcast: BroadcastRequest,
    ) -> Result<BroadcastResponse, PushError> {
        self.pusher().broadcast(broadcast).await
    }
}

impl<H> Inner<H> {
    /// Counts one executing request until dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> Executing<H> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        Executing(self.clone())
    }
}

pub(crate) struct Executing<H>(Arc<Inner<H>>);

impl<H> Drop for Executing<H> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

/// The unary `UpstreamService` over the same handler.
pub struct Unary<H> {
    inner: Arc<Inner<H>>,
}

#[tonic::async_trait]
impl<H: Handler> UpstreamService for Unary<H> {
    async fn process_request(
        &self,
        request: tonic::Request<ProcessRequestRequest>,
    ) -> Result<tonic::Response<ProcessRequestResponse>, tonic::Status> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("draining"));
        }
        let _executing = self.inner.enter();
        match self.inner.handler.handle(request.into_inner()).await {
            Reply::Done(answer) => Ok(tonic::Response::new(answer)),
            Reply::NotExecuted { retry_after_ms } => {
                let mut status = tonic::Status::resource_exhausted("not executed");
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                Err(status)
            }
        }
    }

    async fn get_status(
        &self,
        _request: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<UpstreamStatus>, tonic::Status> {
        let i = &self.inner;
        Ok(tonic::Response::new(UpstreamStatus {
            service_name: i.opts.service_name.clone(),
            zone: i.opts.zone.clone(),
            healthy: i.serving.load(Ordering::SeqCst) && !i.draining.load(Ordering::SeqCst),
            requests_total: i.requests_total.load(Ordering::Relaxed),
            inflight: i.inflight.load(Ordering::SeqCst),
        }))
    }
}
