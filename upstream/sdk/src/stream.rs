//! One data-plane node's stream: requests in, answers, pushes and health out.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream as FuturesStream;
use gatesvr_proto::upstream::gateway_frame::Body as Down;
use gatesvr_proto::upstream::upstream_frame::Body as Up;
use gatesvr_proto::upstream::upstream_stream_service_server::UpstreamStreamService;
use gatesvr_proto::upstream::{
    BroadcastRequest, BroadcastResponse, Drain, GatewayFrame, PushResult, PushToClientRequest,
    StreamBroadcast, StreamBroadcastResult, StreamHealth, StreamPush, StreamPushBatch,
    StreamPushBatchResult, StreamRequest, StreamResponse, UpstreamFrame, UpstreamHello,
};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{Handler, Inner, PushError, Reply};

/// Contract version this library speaks.
const VERSION: u32 = 1;

/// Frames queued towards one node before writers wait.
const OUTGOING_QUEUE: usize = 256;

/// Push window used until the node's hello says otherwise.
const DEFAULT_PUSH_WINDOW: usize = 64;

/// What a push or broadcast waits for.
enum Outcome {
    Push(PushResult),
    Broadcast(StreamBroadcastResult),
    Batch(Vec<PushResult>),
}

/// Encoded bytes a `push_batch` frame is kept under (the node decodes
/// frames of up to 4 MiB; a single push larger than this goes alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// One open stream from one data-plane node.
pub(crate) struct Stream {
    tx: mpsc::Sender<Result<UpstreamFrame, tonic::Status>>,
    /// Ends the response stream (drain, or the node went away).
    end: CancellationToken,
    next_push: AtomicU64,
    /// Pushes and broadcasts sent and not yet answered, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    /// The node's push window (`GatewayHello.max_pushes_in_flight`).
    push_window: Semaphore,
    window_set: std::sync::atomic::AtomicBool,
    /// The node's `GatewayHello.max_push_batch` (0: single pushes only).
    max_push_batch: AtomicU32,
    /// Requests of this stream executing now.
    inflight: AtomicU32,
    /// Cancel handles of executing requests, by id.
    running: Mutex<HashMap<u64, CancellationToken>>,
}

impl Stream {
    fn send(&self, body: Up) -> bool {
        self.tx
            .try_send(Ok(UpstreamFrame { body: Some(body) }))
            .is_ok()
    }

    pub(crate) fn send_health(&self, serving: bool) {
        self.send(Up::Health(StreamHealth { serving }));
    }

    pub(crate) fn send_drain(&self) {
        self.send(Up::Drain(Drain {
            reason: "instance draining".into(),
        }));
    }

    pub(crate) fn end(&self) {
        self.end.cancel();
    }

    pub(crate) async fn push(&self, push: PushToClientRequest) -> Result<PushResult, PushError> {
        let id = self.next_push.fetch_add(1, Ordering::Relaxed);
        let body = Up::Push(StreamPush {
            id,
            push: Some(push),
        });
        match self.request(id, body).await? {
            Outcome::Push(r) if r.code == 0 => Ok(r),
            Outcome::Push(r) => Err(PushError::Refused {
                code: r.code,
                message: r.message,
            }),
            Outcome::Broadcast(_) | Outcome::Batch(_) => Err(PushError::Lost),
        }
    }

    /// Queues `pushes` in order, in `push_batch` frames of at most the
    /// node's `max_push_batch` (each awaited before the next, so order per
    /// session holds across frames); one push frame at a time to a node
    /// that does not take batches. One result per push, in order: a frame
    /// whose stream ended before its result gives its pushes code UNKNOWN
    /// (they may have been queued), the frames after it UNAVAILABLE (not sent).
    /// With `codes_only`, the frames ask for codes (a queued push's result is
    /// its code 0 alone).
    pub(crate) async fn push_batch(
        &self,
        pushes: Vec<PushToClientRequest>,
        codes_only: bool,
    ) -> Vec<PushResult> {
        let max = self.max_push_batch.load(Ordering::SeqCst) as usize;
        // A batch that fits one frame (the usual case) goes as given, and
        // its results come back as they arrived: neither is moved into
        // another `Vec`, push by push.
        let one_frame = || {
            pushes.len() == 1
                || pushes
                    .iter()
                    .map(prost::Message::encoded_len)
                    .sum::<usize>()
                    <= MAX_BATCH_BYTES
        };
        if max != 0 && !pushes.is_empty() && pushes.len() <= max && one_frame() {
            let n = pushes.len();
            return self
                .send_batch(pushes, codes_only)
                .await
                .unwrap_or_else(|lost| vec![lost; n]);
        }
        let mut results = Vec::with_capacity(pushes.len());
        let mut failed: Option<PushResult> = None;
        let mut pushes = pushes.into_iter().peekable();
        while pushes.peek().is_some() {
            if let Some(f) = &failed {
                results.extend(pushes.by_ref().map(|_| not_sent(f)));
                break;
            }
            if max == 0 {
                let push = pushes.next().unwrap_or_default();
                match self.push(push).await {
                    Ok(r) => results.push(r),
                    Err(PushError::Refused { code, message }) => results.push(PushResult {
                        code,
                        message,
                        ..Default::default()
                    }),
                    Err(e) => {
                        let r = lost(&e);
                        failed = Some(r.clone());
                        results.push(r);
                    }
                }
                continue;
            }
            // Sized up front: grown push by push, it was reallocated (and
            // its pushes moved) five times on the way to a frame of 64.
            let mut chunk = Vec::with_capacity(max.min(pushes.len()));
            let mut bytes = 0;
            while let Some(p) = pushes.peek() {
                let len = prost::Message::encoded_len(p);
                if chunk.len() == max || (!chunk.is_empty() && bytes + len > MAX_BATCH_BYTES) {
                    break;
                }
                bytes += len;
                chunk.extend(pushes.next());
            }
            let n = chunk.len();
            match self.send_batch(chunk, codes_only).await {
                Ok(r) => results.extend(r),
                Err(r) => {
                    results.extend((0..n).map(|_| r.clone()));
                    failed = Some(r);
                }
            }
        }
        results
    }

    /// One `push_batch` frame and its results, one per push; else the
    /// result each of its pushes gets (lost or not sent).
    async fn send_batch(
        &self,
        pushes: Vec<PushToClientRequest>,
        codes_only: bool,
    ) -> Result<Vec<PushResult>, PushResult> {
        let n = pushes.len();
        let id = self.next_push.fetch_add(1, Ordering::Relaxed);
        let body = Up::PushBatch(StreamPushBatch {
            id,
            pushes,
            codes_only,
        });
        match self.request(id, body).await {
            Ok(Outcome::Batch(r)) if r.len() == n => Ok(r),
            Ok(_) => Err(lost(&PushError::Lost)),
            Err(e) => Err(lost(&e)),
        }
    }

    pub(crate) async fn broadcast(
        &self,
        broadcast: BroadcastRequest,
    ) -> Result<BroadcastResponse, PushError> {
        let id = self.next_push.fetch_add(1, Ordering::Relaxed);
        let body = Up::Broadcast(StreamBroadcast {
            id,
            broadcast: Some(broadcast),
        });
        match self.request(id, body).await? {
            Outcome::Broadcast(r) if r.code == 0 => Ok(r.response.unwrap_or_default()),
            Outcome::Broadcast(r) => Err(PushError::Refused {
                code: r.code,
                message: r.message,
            }),
            Outcome::Push(_) | Outcome::Batch(_) => Err(PushError::Lost),
        }
    }

    /// Sends a push or broadcast inside the node's window and waits for its result.
    async fn request(&self, id: u64, body: Up) -> Result<Outcome, PushError> {
        let _permit = self
            .push_window
            .acquire()
            .await
            .map_err(|_| PushError::NoStream)?;
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, tx);
        if self
            .tx
            .send(Ok(UpstreamFrame { body: Some(body) }))
            .await
            .is_err()
        {
            self.waiting.lock().remove(&id);
            return Err(PushError::NoStream);
        }
        rx.await.map_err(|_| PushError::Lost)
    }

    fn resolve(&self, id: u64, outcome: Outcome) {
        if let Some(waiter) = self.waiting.lock().remove(&id) {
            let _ = waiter.send(outcome);
        }
    }
}

/// One result per push of a `push_batch_result`: its `results` as they are,
/// or, when the node sent `codes` (the frame asked for codes only), a result
/// per code, the refused pushes' taken from `results` in order (a queued
/// push's is its code 0 alone). A refused code with no result left keeps its
/// code and no message.
fn batch_results(r: StreamPushBatchResult) -> Vec<PushResult> {
    if r.codes.is_empty() {
        return r.results;
    }
    let mut refused = r.results.into_iter();
    r.codes
        .into_iter()
        .map(|code| match code {
            0 => PushResult::default(),
            code => refused.next().unwrap_or(PushResult {
                code,
                ..Default::default()
            }),
        })
        .collect()
}

/// The result of a push whose frame got no result: NO_STREAM was not sent
/// (UNAVAILABLE), anything else may have been queued (UNKNOWN).
fn lost(e: &PushError) -> PushResult {
    let code = match e {
        PushError::NoStream => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    };
    PushResult {
        code: code as i32,
        message: e.to_string(),
        ..Default::default()
    }
}

/// The result of a push not sent because an earlier frame failed.
fn not_sent(earlier: &PushResult) -> PushResult {
    PushResult {
        code: tonic::Code::Unavailable as i32,
        message: format!("not sent: an earlier frame failed ({})", earlier.message),
        ..Default::default()
    }
}

/// The `UpstreamStreamService` of an [`Upstream`](crate::Upstream).
pub struct StreamService<H> {
    pub(crate) inner: Arc<Inner<H>>,
}

type Outgoing = Pin<Box<dyn FuturesStream<Item = Result<UpstreamFrame, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl<H: Handler> UpstreamStreamService for StreamService<H> {
    type OpenStream = Outgoing;

    async fn open(
        &self,
        request: tonic::Request<tonic::Streaming<GatewayFrame>>,
    ) -> Result<tonic::Response<Outgoing>, tonic::Status> {
        let inner = self.inner.clone();
        if inner.draining.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("draining"));
        }
        let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
        let stream = Arc::new(Stream {
            tx,
            end: CancellationToken::new(),
            next_push: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            push_window: Semaphore::new(DEFAULT_PUSH_WINDOW),
            window_set: std::sync::atomic::AtomicBool::new(false),
            max_push_batch: AtomicU32::new(0),
            inflight: AtomicU32::new(0),
            running: Mutex::new(HashMap::new()),
        });
        stream.send(Up::Hello(UpstreamHello {
            version: VERSION,
            service_name: inner.opts.service_name.clone(),
            zone: inner.opts.zone.clone(),
            max_requests_in_flight: inner.opts.max_requests_in_flight,
            serving: inner.serving.load(Ordering::SeqCst),
        }));
        inner.streams.open.lock().push(stream.clone());
        tokio::spawn(read(inner, stream.clone(), request.into_inner()));
        Ok(tonic::Response::new(Box::pin(outgoing(
            rx,
            stream.end.clone(),
        ))))
    }
}

/// The frames to write: everything queued, until `end`; then what was queued
/// before it (answers of a drain), then the end of the stream.
fn outgoing(
    rx: mpsc::Receiver<Result<UpstreamFrame, tonic::Status>>,
    end: CancellationToken,
) -> impl FuturesStream<Item = Result<UpstreamFrame, tonic::Status>> + Send {
    futures::stream::unfold((rx, end, false), |(mut rx, end, ended)| async move {
        if !ended {
            tokio::select! {
                biased;
                item = rx.recv() => return item.map(|i| (i, (rx, end, false))),
                () = end.cancelled() => rx.close(),
            }
        }
        rx.recv().await.map(|i| (i, (rx, end, true)))
    })
}

/// Reads the node's frames until the stream ends.
async fn read<H: Handler>(
    inner: Arc<Inner<H>>,
    stream: Arc<Stream>,
    mut frames: tonic::Streaming<GatewayFrame>,
) {
    loop {
        let frame = tokio::select! {
            frame = frames.message() => frame,
            () = stream.end.cancelled() => break,
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        match frame.body {
            Some(Down::Hello(hello)) => {
                stream
                    .max_push_batch
                    .store(hello.max_push_batch, Ordering::SeqCst);
                if !stream.window_set.swap(true, Ordering::SeqCst) {
                    let want = hello.max_pushes_in_flight as usize;
                    if want > DEFAULT_PUSH_WINDOW {
                        stream.push_window.add_permits(want - DEFAULT_PUSH_WINDOW);
                    } else if want > 0 {
                        // Shrink: keep the permits we may not use.
                        if let Ok(p) = stream
                            .push_window
                            .try_acquire_many((DEFAULT_PUSH_WINDOW - want) as u32)
                        {
                            p.forget();
                        }
                    }
                }
            }
            Some(Down::Request(req)) => start(&inner, &stream, req),
            Some(Down::Cancel(c)) => {
                if let Some(token) = stream.running.lock().remove(&c.id) {
                    token.cancel();
                }
            }
            Some(Down::PushResult(r)) => {
                stream.resolve(r.id, Outcome::Push(r.result.unwrap_or_default()));
            }
            Some(Down::BroadcastResult(r)) => stream.resolve(r.id, Outcome::Broadcast(r)),
            Some(Down::PushBatchResult(r)) => {
                stream.resolve(r.id, Outcome::Batch(batch_results(r)))
            }
            // The node sends nothing new and closes once its requests are answered.
            Some(Down::Drain(_)) | None => {}
        }
    }
    inner
        .streams
        .open
        .lock()
        .retain(|s| !Arc::ptr_eq(s, &stream));
    // Pushes waiting for a result learn it is lost.
    stream.waiting.lock().clear();
    stream.push_window.close();
    for token in stream.running.lock().drain().map(|(_, t)| t) {
        token.cancel();
    }
    stream.end.cancel();
}

/// Runs one request, or answers `not_executed` at once.
fn start<H: Handler>(inner: &Arc<Inner<H>>, stream: &Arc<Stream>, req: StreamRequest) {
    let not_executed = |retry_after_ms| StreamResponse {
        id: req.id,
        not_executed: true,
        retry_after_ms,
        ..Default::default()
    };
    let refuse = inner.draining.load(Ordering::SeqCst) || !inner.serving.load(Ordering::SeqCst);
    let full = stream.inflight.load(Ordering::SeqCst) >= inner.opts.max_requests_in_flight;
    let Some(request) = req.request.filter(|_| !refuse && !full) else {
        stream.send(Up::Response(not_executed(0)));
        return;
    };
    let token = CancellationToken::new();
    stream.running.lock().insert(req.id, token.clone());
    stream.inflight.fetch_add(1, Ordering::SeqCst);
    let executing = inner.enter();
    let (inner, stream) = (inner.clone(), stream.clone());
    let id = req.id;
    let timeout = Duration::from_millis(u64::from(req.timeout_ms.max(1)));
    let run = async move {
        let work = tokio::time::timeout(timeout, inner.handler.handle(request));
        let answer = tokio::select! {
            r = work => r.ok(),
            () = token.cancelled() => None,
        };
        stream.running.lock().remove(&id);
        if let Some(reply) = answer {
            let response = match reply {
                Reply::Done(r) => StreamResponse {
                    id,
                    response: Some(r),
                    ..Default::default()
                },
                Reply::NotExecuted { retry_after_ms } => StreamResponse {
                    id,
                    not_executed: true,
                    retry_after_ms,
                    ..Default::default()
                },
            };
            // Waits for room: the node's reading is the backpressure.
            let _ = stream
                .tx
                .send(Ok(UpstreamFrame {
                    body: Some(Up::Response(response)),
                }))
                .await;
        }
        stream.inflight.fetch_sub(1, Ordering::SeqCst);
        drop(executing);
    };
    // Polled once here, on the stream's reader: a handler that answers
    // without waiting (an echo, a cache hit) is answered with no task spawned
    // and no task wake-up on the request's path. One that waits goes on
    // its own task and is polled there from where it stopped.
    let mut run = Box::pin(run);
    if futures::FutureExt::now_or_never(run.as_mut()).is_none() {
        tokio::spawn(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: tonic::Code, message: &str) -> PushResult {
        PushResult {
            code: code as i32,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn full_results_are_taken_as_they_are() {
        let full = vec![
            PushResult {
                seq_id: 7,
                session_id: "s".into(),
                node_id: "n".into(),
                ..Default::default()
            },
            refused(tonic::Code::NotFound, "no session"),
        ];
        let r = StreamPushBatchResult {
            id: 1,
            results: full.clone(),
            codes: Vec::new(),
        };
        assert_eq!(batch_results(r), full);
    }

    #[test]
    fn codes_take_the_refused_results_in_order() {
        let not_found = refused(tonic::Code::NotFound, "no session");
        let full = refused(tonic::Code::ResourceExhausted, "queue full");
        let r = StreamPushBatchResult {
            id: 1,
            results: vec![not_found.clone(), full.clone()],
            codes: vec![0, 5, 0, 8, 0],
        };
        let ok = PushResult::default();
        assert_eq!(
            batch_results(r),
            vec![ok.clone(), not_found, ok.clone(), full, ok]
        );
    }

    #[test]
    fn a_refused_code_without_its_result_keeps_its_code() {
        let r = StreamPushBatchResult {
            id: 1,
            results: Vec::new(),
            codes: vec![0, 14],
        };
        assert_eq!(
            batch_results(r),
            vec![PushResult::default(), refused(tonic::Code::Unavailable, "")]
        );
    }
}
