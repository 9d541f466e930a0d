//! The data-plane side of the streaming upstream contract (docs/protocol.md
//! §14, `proto/gatesvr/upstream/v1/stream.proto`).
//!
//! One [`StreamLink`] per upstream instance keeps at most one live
//! `UpstreamStreamService.Open` stream, dialled on first use and again
//! after it ends. A request is a `StreamRequest` frame with an id chosen here;
//! its answer comes back as a `StreamResponse` naming the id.
//!
//! What bounds memory, both ways:
//! - requests: at most `min(UpstreamHello.max_requests_in_flight,
//!   stream_max_requests_in_flight)` outstanding per stream (a semaphore). A
//!   request that finds no credit is not sent ([`CallError::NoCredit`]): the
//!   router tries another instance or the client gets a not-executed code. A
//!   stalled upstream therefore holds at most that many requests here;
//! - pushes: at most `stream_max_pushes_in_flight` (told in `GatewayHello`)
//!   outstanding from the upstream; one more is a contract violation that
//!   ends the stream;
//! - frames: the outgoing queue is bounded, and HTTP/2 flow control stops a
//!   reader that does not read.
//!
//! Never executed twice: a request whose frame could not be queued was not
//! sent ([`CallError::NotSent`]); one that was queued and whose stream then
//! ended is [`CallError::Lost`] (outcome unknown) unless the upstream said
//! `not_executed`.
//!
//! ```text
//!  router ─call()─▶ StreamLink ─live()─▶ Live{tx, pending, credit}
//!                                          │ tx: GatewayFrame ─────▶ upstream
//!                                          ▲ reader task ◀── UpstreamFrame
//!                                          │   response: pending[id].send
//!                                          │   push/broadcast: PushSink, result back on tx
//!                                          │   health/drain: flags
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use gatesvr_proto::upstream::gateway_frame::Body as Down;
use gatesvr_proto::upstream::upstream_frame::Body as Up;
use gatesvr_proto::upstream::{
    BroadcastRequest, CancelRequest, GatewayFrame, GatewayHello, ProcessRequestRequest,
    ProcessRequestResponse, PushResult, StreamBroadcastResult, StreamPushBatchResult,
    StreamPushResult, StreamRequest, StreamResponse,
};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::gateway::wire::InPush;
use inbound::{InBody, InFrame};

mod inbound;

/// Contract version this node speaks.
pub const STREAM_VERSION: u32 = 1;

/// Frames queued towards one upstream before senders wait (HTTP/2 flow
/// control does the rest).
const OUTGOING_QUEUE: usize = 256;

/// Most pushes a `push_batch` frame may carry (told in `GatewayHello`; as
/// `PushBatch`).
pub const MAX_PUSH_BATCH: u32 = 1024;

/// Most `push` frames already read off the stream that are queued together
/// (one table lock and one wake-up per session for all of them).
const PUSH_GROUP: usize = 64;

/// Where pushes and broadcasts that arrive on a stream go: the node's
/// `GatewayService` (set once the node exists).
pub trait PushSink: std::fmt::Debug + Send + Sync + 'static {
    /// Queues one push, as `PushToClient`; the result as `PushBatch` reports it.
    fn push(&self, push: InPush) -> BoxFuture<'static, PushResult>;
    /// Queues pushes in order, as `PushBatch`: the batch's answer (one
    /// result per push, in order; with `codes_only`, one code per push and
    /// the refused pushes' results).
    fn push_batch(
        &self,
        pushes: Vec<InPush>,
        codes_only: bool,
    ) -> BoxFuture<'static, crate::gateway::BatchAnswer>;
    /// Queues one broadcast, as `BroadcastToClients`.
    fn broadcast(&self, broadcast: BroadcastRequest) -> BoxFuture<'static, StreamBroadcastResult>;
}

/// Settings a link needs from the router's config.
#[derive(Clone, Debug)]
pub(crate) struct LinkConfig {
    pub node_id: String,
    pub connect_timeout: Duration,
    pub max_pushes_in_flight: u32,
    pub max_requests_in_flight: u32,
}

/// Why a call on a stream produced no executed answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// Nothing was sent: the stream could not be opened, or the instance is
    /// draining or not serving.
    #[error("not sent: {0}")]
    NotSent(String),
    /// Nothing was sent: the instance's request window is full.
    #[error("not sent: the instance's request window is full")]
    NoCredit,
    /// The instance answered that it did not execute the request.
    #[error("not executed by the instance")]
    NotExecuted {
        /// Its back-off hint (0 = none).
        retry_after_ms: u32,
    },
    /// The stream ended after the request was sent: outcome unknown.
    #[error("stream ended with the request in flight")]
    Lost,
    /// No answer within the deadline; a cancel was sent.
    #[error("no answer in time")]
    Timeout,
}

/// One upstream instance's stream, re-dialled when it ends.
pub(crate) struct StreamLink {
    channel: Channel,
    cfg: LinkConfig,
    sink: Arc<std::sync::OnceLock<Arc<dyn PushSink>>>,
    /// The live stream, read by every call (a plain lock held for a clone).
    current: Mutex<Option<Arc<Live>>>,
    /// Held while dialling, so one caller dials while others wait; also
    /// guards the slot's replacement.
    live: tokio::sync::Mutex<Option<Arc<Live>>>,
    /// Requests outstanding on this link (for the router's gauge).
    outstanding: Arc<prometheus::IntGauge>,
    /// Cancelled when the link is dropped (instance gone from the routing
    /// table): its reader stops, and the stream ends.
    gone: tokio_util::sync::CancellationToken,
}

impl Drop for StreamLink {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

impl std::fmt::Debug for StreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLink").finish_non_exhaustive()
    }
}

struct Live {
    tx: mpsc::Sender<GatewayFrame>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    credit: Arc<Semaphore>,
    serving: AtomicBool,
    draining: AtomicBool,
}

#[derive(Default)]
struct Pending {
    /// Set (under this lock) when the stream ended: nothing more is inserted.
    closed: bool,
    waiting: HashMap<u64, oneshot::Sender<StreamResponse>>,
}

impl Live {
    fn usable(&self) -> bool {
        !self.pending.lock().closed
    }

    /// Ends the stream's bookkeeping: every waiting call learns it is lost.
    fn close(&self) {
        let mut pending = self.pending.lock();
        pending.closed = true;
        pending.waiting.clear();
    }
}

impl StreamLink {
    pub(crate) fn new(
        channel: Channel,
        cfg: LinkConfig,
        sink: Arc<std::sync::OnceLock<Arc<dyn PushSink>>>,
        outstanding: Arc<prometheus::IntGauge>,
    ) -> Self {
        Self {
            channel,
            cfg,
            sink,
            current: Mutex::new(None),
            live: tokio::sync::Mutex::new(None),
            outstanding,
            gone: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Sends one request and waits for its answer, at most `timeout`.
    pub(crate) async fn call(
        &self,
        request: ProcessRequestRequest,
        timeout: Duration,
    ) -> Result<ProcessRequestResponse, CallError> {
        let live = self.live().await?;
        if live.draining.load(Ordering::SeqCst) {
            return Err(CallError::NotSent("instance draining".into()));
        }
        if !live.serving.load(Ordering::SeqCst) {
            return Err(CallError::NotSent("instance not serving".into()));
        }
        let Ok(_permit) = live.credit.clone().try_acquire_owned() else {
            return Err(CallError::NoCredit);
        };
        let id = live.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut pending = live.pending.lock();
            if pending.closed {
                return Err(CallError::NotSent("stream ended".into()));
            }
            pending.waiting.insert(id, answer_tx);
        }
        let _outstanding = Outstanding::enter(&self.outstanding);
        let frame = GatewayFrame {
            body: Some(Down::Request(StreamRequest {
                id,
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                request: Some(request),
            })),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, live.tx.send(frame)).await {
            Ok(Ok(())) => {}
            // The stream's sender task is gone: the frame never left.
            Ok(Err(_)) => {
                live.pending.lock().waiting.remove(&id);
                return Err(CallError::NotSent("stream ended".into()));
            }
            // Queued behind a stalled stream for the whole deadline: never left.
            Err(_) => {
                live.pending.lock().waiting.remove(&id);
                return Err(CallError::Timeout);
            }
        }
        match tokio::time::timeout_at(deadline, answer_rx).await {
            Ok(Ok(answer)) if answer.not_executed => Err(CallError::NotExecuted {
                retry_after_ms: answer.retry_after_ms,
            }),
            Ok(Ok(answer)) => Ok(answer.response.unwrap_or_default()),
            Ok(Err(_)) => Err(CallError::Lost),
            Err(_) => {
                live.pending.lock().waiting.remove(&id);
                // Best effort: a full queue means the upstream is not reading.
                let _ = live.tx.try_send(GatewayFrame {
                    body: Some(Down::Cancel(CancelRequest { id })),
                });
                Err(CallError::Timeout)
            }
        }
    }

    /// This node is leaving: tells the upstream (`drain`) and sends no new
    /// requests on the stream. Answers still arrive until the node exits.
    pub(crate) async fn drain(&self) {
        let slot = self.live.lock().await;
        if let Some(live) = slot.as_ref().filter(|l| l.usable()) {
            live.draining.store(true, Ordering::SeqCst);
            // Best effort: a full queue means the upstream is not reading.
            let _ = live.tx.try_send(GatewayFrame {
                body: Some(Down::Drain(gatesvr_proto::upstream::Drain {
                    reason: "gateway node leaving".into(),
                })),
            });
        }
    }

    /// Fails every request still waiting on this link's stream at once
    /// ([`CallError::Lost`]: outcome unknown): the node stops and will not
    /// wait for their answers.
    pub(crate) async fn abandon(&self) {
        if let Some(live) = self.live.lock().await.as_ref() {
            live.close();
        }
    }

    /// The live stream, dialled if there is none.
    ///
    /// Every request comes here: a usable stream is taken from `current`
    /// without the async lock and without the dial's future, which is boxed
    /// (it is several KiB, and every request's future holds this one).
    async fn live(&self) -> Result<Arc<Live>, CallError> {
        if let Some(live) = self.current.lock().as_ref().filter(|l| l.usable()) {
            return Ok(live.clone());
        }
        Box::pin(self.redial()).await
    }

    /// Dials a new stream unless another caller did meanwhile.
    async fn redial(&self) -> Result<Arc<Live>, CallError> {
        let mut slot = self.live.lock().await;
        if let Some(live) = slot.as_ref().filter(|l| l.usable()) {
            return Ok(live.clone());
        }
        let live = tokio::time::timeout(self.cfg.connect_timeout * 2, self.dial())
            .await
            .map_err(|_| CallError::NotSent("stream setup timed out".into()))??;
        *slot = Some(live.clone());
        *self.current.lock() = Some(live.clone());
        Ok(live)
    }

    async fn dial(&self) -> Result<Arc<Live>, CallError> {
        let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
        let hello = GatewayFrame {
            body: Some(Down::Hello(GatewayHello {
                version: STREAM_VERSION,
                node_id: self.cfg.node_id.clone(),
                max_pushes_in_flight: self.cfg.max_pushes_in_flight,
                max_push_batch: MAX_PUSH_BATCH,
            })),
        };
        // Room for it: the queue is new.
        let _ = tx.try_send(hello);
        let mut inbound = open(self.channel.clone(), ReceiverStream::new(rx))
            .await
            .map_err(|s| CallError::NotSent(format!("connect: {}", s.code())))?
            .into_inner();
        let hello = match inbound.message().await {
            Ok(Some(InFrame {
                body: Some(InBody::Other(Up::Hello(hello))),
            })) => hello,
            Ok(_) => return Err(CallError::NotSent("no hello from the upstream".into())),
            Err(s) => return Err(CallError::NotSent(format!("hello: {}", s.code()))),
        };
        let window = match hello.max_requests_in_flight {
            0 => self.cfg.max_requests_in_flight,
            n => n.min(self.cfg.max_requests_in_flight),
        };
        let live = Arc::new(Live {
            tx,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            credit: Arc::new(Semaphore::new(window as usize)),
            serving: AtomicBool::new(hello.serving),
            draining: AtomicBool::new(false),
        });
        tracing::debug!(service = %hello.service_name, zone = %hello.zone, window, "upstream stream open");
        tokio::spawn(read(
            live.clone(),
            inbound,
            self.sink.clone(),
            self.cfg.max_pushes_in_flight,
            self.gone.clone(),
        ));
        Ok(live)
    }
}

/// Reads one stream until it ends, then fails what is still waiting.
///
/// `push` frames that are already read off the stream when one arrives (up
/// to [`PUSH_GROUP`]) are queued together, in order, as one `push_batch`
/// would be, each still answered by its own `push_result`.
async fn read(
    live: Arc<Live>,
    mut inbound: tonic::Streaming<InFrame>,
    sink: Arc<std::sync::OnceLock<Arc<dyn PushSink>>>,
    max_pushes: u32,
    gone: tokio_util::sync::CancellationToken,
) {
    let pushes = Arc::new(Semaphore::new(max_pushes as usize));
    'frames: loop {
        let frame = tokio::select! {
            frame = inbound.message() => frame,
            () = gone.cancelled() => break,
        };
        let mut frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(code = ?status.code(), "upstream stream ended with an error");
                break;
            }
        };
        let mut group = PushGroup::default();
        loop {
            if !handle(&live, &sink, &pushes, frame, &mut group) {
                group.spawn(&live, &sink);
                break 'frames;
            }
            if group.ids.len() >= PUSH_GROUP {
                break;
            }
            // More frames already here? (`message` is cancel-safe.)
            match futures::FutureExt::now_or_never(inbound.message()) {
                Some(Ok(Some(next))) => frame = next,
                Some(Ok(None) | Err(_)) => {
                    group.spawn(&live, &sink);
                    break 'frames;
                }
                None => break,
            }
        }
        group.spawn(&live, &sink);
    }
    live.close();
}

/// Single pushes read together, queued as one run.
#[derive(Default)]
struct PushGroup {
    ids: Vec<u64>,
    pushes: Vec<InPush>,
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Pushes of the group with no body: refused, not queued.
    empty: Vec<u64>,
}

impl PushGroup {
    /// Queues the group (if any) on a task; its results go back on the stream.
    fn spawn(self, live: &Live, sink: &std::sync::OnceLock<Arc<dyn PushSink>>) {
        if self.ids.is_empty() && self.empty.is_empty() {
            return;
        }
        let (tx, sink) = (live.tx.clone(), sink.get().cloned());
        tokio::spawn(async move {
            let results = match sink {
                Some(sink) if !self.pushes.is_empty() => {
                    sink.push_batch(self.pushes, false).await.results
                }
                Some(_) => Vec::new(),
                None => (0..self.ids.len())
                    .map(|_| refused(tonic::Code::Unavailable, "node not ready"))
                    .collect(),
            };
            let missing = refused(tonic::Code::InvalidArgument, "push missing");
            let answered = self
                .ids
                .into_iter()
                .zip(
                    results
                        .into_iter()
                        .map(Some)
                        .chain(std::iter::repeat_with(|| {
                            Some(refused(tonic::Code::Internal, "no result"))
                        })),
                );
            let empty = self.empty.into_iter().map(|id| (id, Some(missing.clone())));
            for (id, result) in answered.chain(empty) {
                let frame = GatewayFrame {
                    body: Some(Down::PushResult(StreamPushResult { id, result })),
                };
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
            drop(self.permits);
        });
    }
}

/// Acts on one frame; false when the stream must end (a window violation).
fn handle(
    live: &Arc<Live>,
    sink: &Arc<std::sync::OnceLock<Arc<dyn PushSink>>>,
    pushes: &Arc<Semaphore>,
    frame: InFrame,
    group: &mut PushGroup,
) -> bool {
    match frame.body {
        Some(InBody::Other(Up::Response(answer))) => {
            let waiter = live.pending.lock().waiting.remove(&answer.id);
            // None: cancelled or timed out meanwhile; the answer is dropped.
            if let Some(waiter) = waiter {
                let _ = waiter.send(answer);
            }
        }
        Some(InBody::Push(push)) => {
            let Ok(permit) = pushes.clone().try_acquire_owned() else {
                tracing::warn!("upstream exceeded max_pushes_in_flight; ending its stream");
                return false;
            };
            group.permits.push(permit);
            match push.push {
                Some(p) => {
                    group.ids.push(push.id);
                    group.pushes.push(p);
                }
                None => group.empty.push(push.id),
            }
        }
        Some(InBody::PushBatch(batch)) => {
            let Ok(permit) = pushes.clone().try_acquire_owned() else {
                tracing::warn!("upstream exceeded max_pushes_in_flight; ending its stream");
                return false;
            };
            // Pushes read before this frame are queued before it.
            std::mem::take(group).spawn(live, sink);
            let (tx, sink) = (live.tx.clone(), sink.get().cloned());
            tokio::spawn(async move {
                let n = batch.pushes.len();
                let all = |result| crate::gateway::BatchAnswer::all(batch.codes_only, n, result);
                let answer = match sink {
                    _ if n > MAX_PUSH_BATCH as usize => {
                        let why = format!("at most {MAX_PUSH_BATCH} pushes per push_batch");
                        all(refused(tonic::Code::InvalidArgument, &why))
                    }
                    Some(sink) => sink.push_batch(batch.pushes, batch.codes_only).await,
                    None => all(refused(tonic::Code::Unavailable, "node not ready")),
                };
                let frame = GatewayFrame {
                    body: Some(Down::PushBatchResult(StreamPushBatchResult {
                        id: batch.id,
                        results: answer.results,
                        codes: answer.codes,
                    })),
                };
                let _ = tx.send(frame).await;
                drop(permit);
            });
        }
        Some(InBody::Other(Up::Broadcast(b))) => {
            let Ok(permit) = pushes.clone().try_acquire_owned() else {
                tracing::warn!("upstream exceeded max_pushes_in_flight; ending its stream");
                return false;
            };
            let (tx, sink) = (live.tx.clone(), sink.get().cloned());
            tokio::spawn(async move {
                let mut result = match (sink, b.broadcast) {
                    (Some(sink), Some(req)) => sink.broadcast(req).await,
                    _ => StreamBroadcastResult {
                        code: tonic::Code::Unavailable as i32,
                        message: "node not ready".into(),
                        ..Default::default()
                    },
                };
                result.id = b.id;
                let _ = tx
                    .send(GatewayFrame {
                        body: Some(Down::BroadcastResult(result)),
                    })
                    .await;
                drop(permit);
            });
        }
        Some(InBody::Other(Up::Health(h))) => live.serving.store(h.serving, Ordering::SeqCst),
        Some(InBody::Other(Up::Drain(_))) => live.draining.store(true, Ordering::SeqCst),
        // A second hello or an empty frame: ignored (fields are added compatibly).
        // (Pushes never decode as `Other`: `inbound` decodes them itself.)
        Some(InBody::Other(Up::Hello(_) | Up::Push(_) | Up::PushBatch(_))) | None => {}
    }
    true
}

/// Opens `UpstreamStreamService/Open` as the generated client does, with the
/// node's own decoding of what comes back ([`InFrame`]: pushes not copied
/// out of the received buffers).
async fn open(
    channel: Channel,
    frames: ReceiverStream<GatewayFrame>,
) -> Result<tonic::Response<tonic::Streaming<InFrame>>, tonic::Status> {
    const SERVICE: &str = "gatesvr.upstream.v1.UpstreamStreamService";
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<GatewayFrame, InFrame>::default();
    let path =
        ::http::uri::PathAndQuery::from_static("/gatesvr.upstream.v1.UpstreamStreamService/Open");
    let mut request = tonic::Request::new(frames);
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new(SERVICE, "Open"));
    grpc.streaming(request, path, codec).await
}

fn refused(code: tonic::Code, message: &str) -> PushResult {
    PushResult {
        code: code as i32,
        message: message.to_owned(),
        ..Default::default()
    }
}

/// Counts one request in the outstanding gauge while alive.
struct Outstanding<'a>(&'a prometheus::IntGauge);

impl<'a> Outstanding<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
