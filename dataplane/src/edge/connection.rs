//! One client connection: the thin I/O shell around a [`Session`].
//!
//! The same code serves every transport (native QUIC, WebTransport,
//! WebSocket) through a [`Link`] (see [`crate::transport`]). The client
//! sends Start first. After that ONE
//! task serves the connection: it decodes frames and feeds the session,
//! drives the requests it is executing (no task per request, no writer task),
//! and writes responses, heartbeat answers, frames other tasks queued (drain
//! GoAway, answers to requests begun on an earlier connection) and whatever
//! the session yields from `poll_transmit`, woken by the entry's `Notify`.
//! Every wake-up ends in at most one stream write.
//!
//! ```text
//!  FrameSource ─────────────────> handle_frame ─┬─> Session (ack, dedupe) ─────────────────┐
//!                                               └─> in-flight requests ─> complete ─────────┤
//!  other tasks ─> control channel ──────────────────────────────────────────────────────────┤
//!  Session::poll_transmit (pushes) ─────────────────────────────────────────────────────────┴─> one write
//! ```
//!
//! Fatal errors are sent as an `Error` frame, the stream is finished, and the
//! connection is closed with the same code (the QUIC application error code,
//! or `4000 + code` in a WebSocket close frame).
//!
//! Limits a client meets here (docs/protocol.md §10): the Start rate limit
//! (per source address before the token is checked, per openid after), the
//! write deadline on every write (a client that stops reading is closed with
//! SLOW_CONSUMER), and answers checked against the frame limit
//! (FRAME_TOO_LARGE instead of a frame the client would refuse).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::SinkExt;
use futures::stream::{FuturesUnordered, StreamExt};
use gatesvr_proto::client::{
    ClientRequest, ClientResponse, Envelope, ErrorCode, HeartbeatResponse, StartRequest,
    StartResponse, envelope::Body,
};
use gatesvr_proto::frame;

use crate::core::RequestOutcome;
use crate::errors::ClientError;
use crate::node::Node;
use crate::registry::{Attachment, SessionEntry};
use crate::session::RequestDisposition;
use crate::transport::{Link, Transport, WriteError};

/// Longest openid accepted, bytes.
pub const MAX_OPENID_LEN: usize = 128;

/// Frames waiting for the writer besides pushes; bounds per-connection memory.
const CONTROL_QUEUE: usize = 64;

/// Time allowed for the Error frame to reach the client before closing.
const ERROR_FLUSH: Duration = Duration::from_secs(1);

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn env(body: Body) -> Envelope {
    Envelope { body: Some(body) }
}

/// A connection-ending error.
struct Fatal {
    code: ErrorCode,
    message: String,
    /// `Error.retry_after_ms` (the Start rate limit says when to retry).
    retry_after_ms: u32,
}

impl Fatal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    /// The client stopped reading: its write missed `server.write_timeout`.
    /// No Error frame can reach it; the close code says it.
    fn write_timeout() -> Self {
        Self::new(
            ErrorCode::SlowConsumer,
            "write deadline exceeded: the client stopped reading",
        )
    }
}

impl From<ClientError> for Fatal {
    fn from(told: ClientError) -> Self {
        Self {
            code: told.code,
            message: told.message.into_owned(),
            retry_after_ms: told.retry_after_ms,
        }
    }
}

async fn write_frame(link: &mut Link, frame: &Envelope) -> Result<(), WriteError> {
    let mut buf = BytesMut::new();
    frame::encode(frame, &mut buf);
    link.sink.write(&mut buf).await
}

/// Counts a write that missed its deadline (`started`: after Start).
fn count_write_timeout(node: &Node, transport: Transport, started: bool) {
    let phase = if started { "session" } else { "start" };
    node.metrics
        .client_write_timeouts
        .with_label_values(&[transport.label(), phase])
        .inc();
}

/// Sends `Error{fatal}` (unless `stream_open` is false), waits briefly for
/// it to be delivered, closes.
async fn fail(node: &Node, link: &mut Link, stream_open: bool, fatal: Fatal) {
    node.metrics
        .connections_closed
        .with_label_values(&[&crate::metrics::code_label(fatal.code)])
        .inc();
    end(node, link, stream_open, fatal).await;
}

/// [`fail`] without counting: the caller (the registry) counted already.
/// The Error frame gets at most ERROR_FLUSH (and never more than
/// `server.write_timeout`): a client that does not read it is closed anyway.
async fn end(node: &Node, link: &mut Link, stream_open: bool, fatal: Fatal) {
    if stream_open {
        let frame = env(Body::Error(gatesvr_proto::client::Error {
            code: fatal.code as i32,
            message: fatal.message.clone(),
            retry_after_ms: fatal.retry_after_ms,
            fatal: true,
        }));
        let mut buf = BytesMut::new();
        frame::encode(&frame, &mut buf);
        match link.sink.write_within(&mut buf, ERROR_FLUSH).await {
            Ok(()) => link.sink.finish(ERROR_FLUSH).await,
            Err(WriteError::Deadline) => count_write_timeout(node, link.transport, false),
            Err(WriteError::Closed) => {}
        }
    }
    link.close(fatal.code, &fatal.message, ERROR_FLUSH).await;
}

/// Serves one accepted native QUIC connection until it ends.
pub async fn serve_quic(node: Arc<Node>, conn: quinn::Connection) {
    let start_timeout = node.config.server.start_timeout;
    let stream = tokio::time::timeout(start_timeout, conn.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return, // closed before opening a stream
        Err(_) => {
            node.metrics
                .connections_rejected
                .with_label_values(&["start_timeout"])
                .inc();
            node.metrics
                .connections_closed
                .with_label_values(&[&crate::metrics::code_label(ErrorCode::StartTimeout)])
                .inc();
            conn.close(
                crate::errors::quic_close_code(ErrorCode::StartTimeout),
                b"no stream opened in time",
            );
            return;
        }
    };
    let limits = crate::transport::LinkLimits::of(&node.config.server);
    let link = Link::quic(conn, send, recv, limits);
    serve(node, link).await;
}

/// Serves one client connection, whatever its transport, until it ends.
pub(crate) async fn serve(node: Arc<Node>, mut link: Link) {
    let start_timeout = node.config.server.start_timeout;
    let transport = link.transport;

    // --- Start ---
    let opened = tokio::time::Instant::now();
    let first = tokio::time::timeout(start_timeout, link.source.next()).await;
    let read = tokio::time::Instant::now();
    node.metrics
        .start_phase
        .with_label_values(&["start_frame"])
        .observe((read - opened).as_secs_f64());
    let start = match first {
        Err(_) => Err(Fatal::new(
            ErrorCode::StartTimeout,
            "no Start frame in time",
        )),
        Ok(Err(e)) => Err(Fatal::from(ClientError::frame(&e))),
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Envelope {
            body: Some(Body::Start(start)),
        }))) => Ok(start),
        Ok(Ok(Some(_))) => Err(Fatal::new(
            ErrorCode::ProtocolViolation,
            "the first frame must be Start",
        )),
    };
    // The address limit before the (costly) token check, the openid limit
    // after it: only the token's holder spends an openid's budget.
    let admitted = start
        .map_err(|fatal| (fatal, None))
        .and_then(|s| rate_limit(node.start_limit.check_address(link.peer.ip()), s))
        .and_then(|s| authenticate(&node, s).map_err(|fatal| (fatal, None)))
        .and_then(|s| {
            let checked = node.start_limit.check_openid(&s.openid);
            rate_limit(checked, s)
        });
    let start = match admitted {
        Ok(s) => s,
        Err((fatal, limited)) => {
            let reason = match limited {
                Some(limited) => limited.reason().to_string(),
                None => crate::metrics::code_label(fatal.code),
            };
            node.metrics
                .connections_rejected
                .with_label_values(&[&reason])
                .inc();
            Box::pin(fail(&node, &mut link, true, fatal)).await;
            return;
        }
    };

    if node.draining.load(std::sync::atomic::Ordering::Relaxed) {
        let fatal = Fatal::new(
            ErrorCode::Draining,
            "node is draining: connect to another node",
        );
        Box::pin(fail(&node, &mut link, true, fatal)).await;
        return;
    }
    let new_id = crate::registry::new_session_id();
    // Boxed (here and for `fail`): a future is as large as its largest
    // state, and every idle connection would carry these rare ones inline.
    let claim = match Box::pin(claim_ownership(&node, &start, &new_id)).await {
        Ok(claim) => claim,
        Err(fatal) => {
            Box::pin(fail(&node, &mut link, true, fatal)).await;
            return;
        }
    };

    let conn_id = node.registry.next_conn_id();
    let (control_tx, control_rx) = futures::channel::mpsc::channel(CONTROL_QUEUE);
    let started = node.registry.start(
        &start.openid,
        &start.session_id,
        start.last_acked_seq_id,
        Attachment {
            conn_id,
            connection: link.handle(),
            control: control_tx,
        },
        new_id.clone(),
    );
    let entry = started.entry;
    let outcome = started.outcome;
    if let Some(claim) = claim {
        node.registry
            .claimed(&entry, claim.epoch, node.cluster.as_deref());
        // The session attached has an id the claim did not record (a session
        // that stands in for the resumed one, made by another Start; a control
        // plane older than `fresh_session_id`): record it in the control
        // plane too. A fresh session made by this Start has the id the claim
        // recorded beside the resumed one, and needs no second claim.
        if !claim.recorded(&entry.identity.session_id)
            && let Some(cluster) = &node.cluster
            && let Ok(c) =
                Box::pin(cluster.claim(&start.openid, &entry.identity.session_id, "")).await
        {
            node.registry
                .claimed(&entry, c.epoch, node.cluster.as_deref());
        }
    }
    let server = &node.config.server;
    let response = env(Body::StartOk(StartResponse {
        session_id: entry.identity.session_id.clone(),
        node_id: node.config.node_id.clone(),
        zone: entry.identity.zone.clone(),
        heartbeat_interval_ms: server.heartbeat_interval.as_millis() as u32,
        next_seq_id: outcome.next_seq_id,
        resumed: outcome.status == gatesvr_proto::client::ResumeStatus::Resumed,
        resume_status: outcome.status as i32,
        first_available_seq_id: outcome.first_available_seq_id,
        server_time_ms: unix_ms(),
        max_frame_size: server.max_frame_size as u32,
        request_window: server.request_window as u32,
        session_timeout_ms: server.session_timeout.as_millis() as u32,
    }));
    if let Err(e) = write_frame(&mut link, &response).await {
        node.registry.detach(&entry, conn_id);
        if e == WriteError::Deadline {
            count_write_timeout(&node, transport, false);
            let fatal = Fatal::write_timeout();
            Box::pin(fail(&node, &mut link, false, fatal)).await;
        }
        return;
    }
    node.metrics
        .start_phase
        .with_label_values(&["answered"])
        .observe(read.elapsed().as_secs_f64());
    node.metrics.active_connections.inc();
    let by_transport = node
        .metrics
        .transport_connections
        .with_label_values(&[transport.label()]);
    by_transport.inc();
    tracing::debug!(openid = %start.openid, session = %entry.identity.session_id, status = ?outcome.status, transport = transport.label(), "session started");

    let ending = run(&node, &entry, conn_id, &mut link, control_rx).await;
    node.registry.detach(&entry, conn_id);
    node.metrics.active_connections.dec();
    by_transport.dec();
    match ending {
        Ending::Protocol(fatal) => {
            node.metrics
                .protocol_errors
                .with_label_values(&[&crate::metrics::code_label(fatal.code)])
                .inc();
            Box::pin(fail(&node, &mut link, true, fatal)).await;
        }
        // Asked by the registry (replaced, slow consumer, drain), which counted it.
        Ending::Requested(fatal) => Box::pin(end(&node, &mut link, true, fatal)).await,
        Ending::WriteTimeout => {
            count_write_timeout(&node, transport, true);
            Box::pin(fail(&node, &mut link, false, Fatal::write_timeout())).await;
        }
        Ending::Done => match link.pending_close() {
            Some((code, message)) => {
                Box::pin(end(&node, &mut link, true, Fatal::new(code, message))).await;
            }
            None if transport != Transport::Quic => {
                let fatal = Fatal::new(ErrorCode::Ok, "");
                Box::pin(end(&node, &mut link, false, fatal)).await;
            }
            None => {}
        },
    }
}

/// The session id a Start claims: the one it resumes, else the fresh one.
fn claimed_id<'a>(start: &'a StartRequest, new_id: &'a str) -> &'a str {
    if start.session_id.is_empty() {
        new_id
    } else {
        &start.session_id
    }
}

/// Ends a Start's incoming state (`Registry::end_incoming`) when dropped.
struct SettleOnDrop<'a> {
    node: &'a Arc<Node>,
    openid: &'a str,
}

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        self.node.registry.end_incoming(self.openid);
    }
}

/// A Start's claim: the epoch, and the session ids the owner record holds.
struct StartClaim {
    epoch: u64,
    /// The id claimed: the one resumed, else the fresh one.
    claimed: String,
    /// The fresh id the record holds beside the claimed one: this Start's
    /// `new_id`, another Start's (a retried claim keeps the one recorded
    /// first: that Start's fresh session, which a retry attaches to), or
    /// empty (a new session; a control plane older than the field). This
    /// Start's fresh session is always made with `new_id`: a session id is
    /// never given to two sessions.
    fresh: String,
}

impl StartClaim {
    /// Whether the owner record already names session `session_id`.
    fn recorded(&self, session_id: &str) -> bool {
        session_id == self.claimed || (!self.fresh.is_empty() && session_id == self.fresh)
    }
}

/// Claims the session in the control plane (a new epoch) and, if another
/// live node held it, takes its state over. A Start resuming a session
/// claims it with `new_id` as the fresh id ([`crate::cluster::Cluster::claim`]):
/// if the resume fails (SESSION_EXPIRED, SEQ_AHEAD, RECOVERED), the fresh
/// session made with `new_id` is already recorded, and the Start claims
/// once. `Ok(None)`: standalone node, or the control plane is unreachable
/// and the session runs provisionally.
async fn claim_ownership(
    node: &Arc<Node>,
    start: &StartRequest,
    new_id: &str,
) -> Result<Option<StartClaim>, Fatal> {
    let Some(cluster) = &node.cluster else {
        return Ok(None);
    };
    let openid = &start.openid;
    // Before the claim goes out: a staged copy here serves nothing until this
    // Start settled which state is the session's (the claim's answer names
    // this node, and a push or watch delta may land before `begin_incoming`).
    // Settled on every way out of here, a cancelled Start too.
    node.registry.claim_begins(openid);
    let _settle = SettleOnDrop { node, openid };
    // A leader election takes seconds: the claim is held through it (tried
    // again while unavailable, after a renewal if this node's lease lapsed
    // meanwhile; `core::claim`) before falling back to a provisional session.
    let claim_started = tokio::time::Instant::now();
    let claim_id = claimed_id(start, new_id);
    let fresh = if start.session_id.is_empty() {
        ""
    } else {
        new_id
    };
    let patient = cluster.claim_patiently(openid, claim_id, fresh).await;
    node.metrics
        .start_phase
        .with_label_values(&["claim"])
        .observe(claim_started.elapsed().as_secs_f64());
    node.metrics
        .start_claim_retries
        .inc_by(u64::from(patient.retries));
    if patient.retries > 0 {
        tracing::debug!(openid = %openid, retries = patient.retries, claim_ms = claim_started.elapsed().as_millis() as u64, ok = patient.result.is_ok(), "claim tried again through a control-plane leader change");
    }
    let refused = patient.failure == Some(crate::core::ClaimFailure::Refused);
    match patient.result {
        Ok(claimed) => {
            // The control plane names no other node, but this node knows
            // nothing of the session it resumes: an earlier life of this node
            // held it (a restart keeps the node id; the control plane takes
            // the claim for a retry), and its durable pushes survive only as
            // replicas (`peer::take_over`).
            let earlier_life =
                !start.session_id.is_empty() && !node.registry.with_table(|t| t.knows(openid));
            tracing::debug!(openid = %openid, claim_ms = claim_started.elapsed().as_millis() as u64, previous = ?claimed.previous_owner, earlier_life, "claimed");
            let previous = claimed
                .previous_owner
                .clone()
                .or_else(|| earlier_life.then(|| node.config.node_id.clone()));
            if let Some(previous) = &previous {
                // Pushes for this openid arriving meanwhile wait for the state.
                node.registry.begin_incoming(openid);
                crate::peer::take_over(node, previous, openid, &start.session_id, claimed.epoch)
                    .await;
                node.registry.end_incoming(openid);
            }
            node.provisional.lock().remove(openid);
            Ok(Some(StartClaim {
                epoch: claimed.epoch,
                claimed: claim_id.to_string(),
                fresh: claimed.fresh_session_id,
            }))
        }
        Err(e) if !refused => {
            // Static stability: serve now, claim when the control plane is
            // back (unreachable, or this node's lease not renewed in time).
            tracing::debug!(openid = %openid, reason = %e, "control plane unreachable: provisional session");
            node.metrics
                .provisional_sessions
                .with_label_values(&["started"])
                .inc();
            node.provisional.lock().insert(openid.clone());
            // No claim, no handover: a Handover needs a claim's epoch to fence
            // against (an epoch-0 handover took sessions unfenced). A resume
            // of a session held by another node starts fresh here and says so
            // (SESSION_EXPIRED); the owner keeps its copy until a claim.
            Ok(None)
        }
        Err(e) => {
            tracing::info!(openid = %openid, error = %e, "claim refused: Start refused with DRAINING");
            node.metrics
                .connections_rejected
                .with_label_values(&["claim_refused"])
                .inc();
            Err(Fatal::from(ClientError::claim_refused(&e)))
        }
    }
}

/// Refuses a Start over a rate limit with OVERLOADED and when to retry.
fn rate_limit(
    checked: Result<(), (crate::start_limit::Limited, Duration)>,
    start: StartRequest,
) -> Result<StartRequest, (Fatal, Option<crate::start_limit::Limited>)> {
    let Err((limited, wait)) = checked else {
        return Ok(start);
    };
    let ms = wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
    let whose = match limited {
        crate::start_limit::Limited::Address => "this address",
        crate::start_limit::Limited::Openid => "this openid",
    };
    let mut fatal = Fatal::new(
        ErrorCode::Overloaded,
        format!("too many Starts from {whose}: retry after {ms} ms"),
    );
    fatal.retry_after_ms = ms;
    Err((fatal, Some(limited)))
}

fn authenticate(node: &Node, start: StartRequest) -> Result<StartRequest, Fatal> {
    if start.openid.is_empty() || start.openid.len() > MAX_OPENID_LEN {
        return Err(Fatal::new(
            ErrorCode::ProtocolViolation,
            format!("openid must be 1..={MAX_OPENID_LEN} bytes"),
        ));
    }
    if let Err(e) = node.verifier.verify(&start.openid, &start.auth_token) {
        node.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        tracing::debug!(openid = %start.openid, error = %e, "Start refused: token");
        return Err(Fatal::from(ClientError::auth(&e)));
    }
    Ok(start)
}

/// A request being executed by the connection's task.
type Executing = futures::future::BoxFuture<'static, ClientResponse>;

/// Most bytes of pushes gathered into one stream write.
const WRITE_BATCH: usize = 64 * 1024;

/// A QUIC packet's bytes around its STREAM data, about (header, frame
/// header, AEAD tag, an ACK frame riding along): what `server.push_coalesce`
/// subtracts from the UDP payload to call a datagram full.
const QUIC_OVERHEAD: usize = 100;

/// What a frame asks of the connection's loop.
enum Flow {
    Continue,
    /// The client stopped its session: end without an error.
    Stop,
}

/// How [`run`] ended.
enum Ending {
    /// The client left (stream ended, Stop) or the registry let go.
    Done,
    /// The client broke the protocol.
    Protocol(Fatal),
    /// The registry asked a WebTransport/WebSocket connection to close.
    Requested(Fatal),
    /// A write missed `server.write_timeout`: the client stopped reading.
    WriteTimeout,
}

/// The connection's steady state, until the stream or connection ends or a
/// fatal error. Requests still executing at the end finish in the
/// background: their answers wait in the session for the client's retry.
async fn run(
    node: &Arc<Node>,
    entry: &Arc<SessionEntry>,
    conn_id: u64,
    link: &mut Link,
    mut control: futures::channel::mpsc::Receiver<bytes::Bytes>,
) -> Ending {
    let silence = node.config.server.heartbeat_timeout;
    let idle = tokio::time::sleep(silence);
    tokio::pin!(idle);
    // `server.push_coalesce`: while the node is busy, pushes may wait (at
    // most this long) to fill a datagram while earlier ones are unacked.
    // `hold` runs while they wait.
    let coalesce = node.config.server.push_coalesce;
    let datagram = usize::from(node.config.server.max_udp_payload_size) - QUIC_OVERHEAD;
    let hold = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(hold);
    let (mut holding, mut held_enough) = (false, false);
    let mut executing: FuturesUnordered<Executing> = FuturesUnordered::new();
    let mut out = BytesMut::new();
    let Link {
        source,
        sink,
        closing,
        ..
    } = link;
    let ending = 'serve: loop {
        tokio::select! {
            biased;
            (code, message) = crate::transport::close_requested(closing) => {
                break Ending::Requested(Fatal::new(code, message));
            }
            Some(response) = executing.next(), if !executing.is_empty() => {
                complete(entry, conn_id, response, &mut out);
            }
            frame = control.next() => match frame {
                Some(frame) => out.extend_from_slice(&frame),
                // The registry let go of this connection (replaced).
                None => break Ending::Done,
            },
            () = entry.wake.notified() => {}
            frame = source.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + silence);
                let mut frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break Ending::Done,
                    Err(e) => break Ending::Protocol(Fatal::from(ClientError::frame(&e))),
                };
                // Every frame already received is handled before one write.
                loop {
                    match handle_frame(node, entry, frame, &mut out, &mut executing) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stop) => break 'serve Ending::Done,
                        Err(fatal) => break 'serve Ending::Protocol(fatal),
                    }
                    frame = match source.buffered() {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break,
                        Err(e) => break 'serve Ending::Protocol(Fatal::from(ClientError::frame(&e))),
                    };
                }
            },
            () = &mut idle => {
                break Ending::Protocol(Fatal::new(
                    ErrorCode::HeartbeatTimeout,
                    "no frame within heartbeat_timeout",
                ));
            }
            () = &mut hold, if holding => held_enough = true,
        }
        // Anything else to write (answers, control frames) takes the pushes
        // along; so does the end of the hold.
        if !coalesce.is_zero()
            && !held_enough
            && out.is_empty()
            && node.load.coalescing()
            && entry.state.lock().may_hold_pushes(datagram)
        {
            if !holding {
                holding = true;
                node.metrics.push_holds.inc();
                hold.as_mut().reset(tokio::time::Instant::now() + coalesce);
            }
            continue;
        }
        (holding, held_enough) = (false, false);
        transmit(node, entry, &mut out);
        if !out.is_empty() {
            // A close asked meanwhile wins over a write the client does not read.
            tokio::select! {
                written = sink.write(&mut out) => match written {
                    Ok(()) => {}
                    Err(WriteError::Deadline) => break Ending::WriteTimeout,
                    Err(WriteError::Closed) => break Ending::Done,
                },
                (code, message) = crate::transport::close_requested(closing) => {
                    break Ending::Requested(Fatal::new(code, message));
                }
            }
        }
    };
    for request in executing {
        let (node, entry) = (node.clone(), entry.clone());
        tokio::spawn(async move {
            let response = request.await;
            node.registry.complete_request(&entry, response).await;
        });
    }
    ending
}

/// Moves pushes the session has ready into `out`, up to one write's worth;
/// re-arms the wake-up if more are waiting.
fn transmit(node: &Node, entry: &Arc<SessionEntry>, out: &mut BytesMut) {
    let (pushes, moved) = {
        let mut state = entry.state.lock();
        // Writing pushes starts the retransmit deadline if none was in
        // flight, and leaves it alone otherwise (it is the oldest unacked
        // push's).
        let idle = !state.has_in_flight();
        // The payload was encoded once, when queued (session/body.rs).
        let pushes = state.transmit_into(Instant::now(), out, WRITE_BATCH);
        (pushes, idle && pushes > 0)
    };
    let more = out.len() >= WRITE_BATCH;
    if pushes == 0 {
        return;
    }
    // Sending armed the retransmit deadline when nothing was in flight: the
    // table's timers follow it. Behind unacked pushes the deadline (the
    // oldest unacked push's) did not move, and the table lock is not taken.
    // (The table's timer is never later than the session's deadline: only
    // an ack moves that without the table, and only later.)
    if moved {
        node.registry.rearm(entry);
    }
    node.metrics.pushes_sent.inc_by(pushes);
    if more {
        // The write was cut at WRITE_BATCH: come back for the rest without
        // waiting for a wake-up.
        entry.wake.notify_one();
    }
}

/// Stores an executed request's answer in the session and sends it to the
/// connection attached now: this one (into `out`), or a newer one.
///
/// The answer is encoded first and then moved into the session (no copy of
/// it). It is stored before the attached connection is read, as always: a
/// client that reconnects meanwhile either finds it stored (its retry gets
/// it from the session) or is the connection it is sent to here.
fn complete(entry: &Arc<SessionEntry>, conn_id: u64, response: ClientResponse, out: &mut BytesMut) {
    let before = out.len();
    let envelope = env(Body::Response(response));
    frame::encode(&envelope, out);
    if let Some(Body::Response(response)) = envelope.body {
        entry
            .state
            .lock()
            .complete_request(response.seq_id, response);
    }
    let elsewhere = match entry.attached.lock().as_ref() {
        Some(a) if a.conn_id == conn_id => None,
        Some(a) => Some(a.control.clone()),
        None => return out.truncate(before),
    };
    if let Some(mut control) = elsewhere {
        // The client reconnected meanwhile; that connection's task writes it.
        let frame = out.split_off(before).freeze();
        tokio::spawn(async move {
            // A closed channel means that connection just ended too; the
            // session keeps the answer for the retry.
            let _ = control.send(frame).await;
        });
    }
}

fn handle_frame(
    node: &Arc<Node>,
    entry: &Arc<SessionEntry>,
    frame: Envelope,
    out: &mut BytesMut,
    executing: &mut FuturesUnordered<Executing>,
) -> Result<Flow, Fatal> {
    let Some(body) = frame.body else {
        return Err(Fatal::new(ErrorCode::BadFrame, "envelope has no body"));
    };
    match body {
        Body::Heartbeat(hb) => {
            let answer = HeartbeatResponse {
                client_timestamp: hb.client_timestamp,
                server_timestamp: unix_ms(),
            };
            frame::encode(&env(Body::HeartbeatOk(answer)), out);
        }
        Body::Ack(ack) => {
            let result = entry.state.lock().on_ack(Instant::now(), ack.acked_seq_id);
            if let Err(e) = result {
                return Err(Fatal::new(ErrorCode::ProtocolViolation, e.to_string()));
            }
        }
        Body::Request(request) => handle_request(node, entry, request, out, executing)?,
        Body::Stop(stop) => {
            tracing::debug!(openid = %entry.identity.openid, reason = %stop.reason, "client stopped its session");
            node.registry.remove(entry, "stopped");
            entry.close_connection(ErrorCode::SessionClosed, "session stopped");
            return Ok(Flow::Stop);
        }
        Body::Start(_) => {
            return Err(Fatal::new(ErrorCode::ProtocolViolation, "Start sent twice"));
        }
        _ => {
            return Err(Fatal::new(
                ErrorCode::ProtocolViolation,
                "server-only frame sent by the client",
            ));
        }
    }
    Ok(Flow::Continue)
}

fn error_response(
    request: &ClientRequest,
    zone: &str,
    code: ErrorCode,
    message: String,
    retry_after_ms: u32,
) -> ClientResponse {
    ClientResponse {
        msg_id: request.msg_id,
        seq_id: request.seq_id,
        code: code as i32,
        payload: Default::default(),
        message,
        zone: zone.to_string(),
        app_code: 0,
        retry_after_ms,
    }
}

/// An upstream answer too large for the client's frame limit becomes
/// FRAME_TOO_LARGE: sending it would break the client's stream (its decoder
/// refuses the frame and the connection dies), and it would be replayed to
/// every retry.
fn fit_frame(response: ClientResponse, request: &ClientRequest, max: usize) -> ClientResponse {
    use prost::Message;
    // Envelope.response: one key byte, the length, the message.
    let body = response.encoded_len();
    let len = 1 + prost::encoding::encoded_len_varint(body as u64) + body;
    if len <= max {
        return response;
    }
    error_response(
        request,
        &response.zone,
        ErrorCode::FrameTooLarge,
        format!(
            "the upstream's answer is {len} bytes encoded, over the client frame limit of {max} bytes (server.max_frame_size); not sent"
        ),
        0,
    )
}

/// Answers a request at once (cached answer, refusal) into `out`, or starts
/// executing it.
fn handle_request(
    node: &Arc<Node>,
    entry: &Arc<SessionEntry>,
    request: ClientRequest,
    out: &mut BytesMut,
    executing: &mut FuturesUnordered<Executing>,
) -> Result<(), Fatal> {
    let zone = &entry.identity.zone;
    if !request.openid.is_empty() && request.openid != entry.identity.openid {
        return Err(Fatal::new(
            ErrorCode::OpenidMismatch,
            "request openid differs from the session's",
        ));
    }
    let mut reply = |response: ClientResponse| frame::encode(&env(Body::Response(response)), out);
    let disposition = match node.registry.begin_request(entry, request.seq_id) {
        RequestOutcome::Here(d) => d,
        // The session left this node (drain staging, handover, fencing): not
        // executed here, or its retry on the new node would run it twice.
        RequestOutcome::NotHere => {
            node.count_request(zone, ErrorCode::Draining);
            reply(error_response(
                &request,
                zone,
                ErrorCode::Draining,
                "not executed: the session moved to another node; retry after reconnecting"
                    .to_string(),
                0,
            ));
            return Ok(());
        }
    };
    match disposition {
        RequestDisposition::Execute => {}
        RequestDisposition::Cached(response) => {
            reply(response);
            return Ok(());
        }
        // The first attempt's answer goes to the attached connection when ready.
        RequestDisposition::InFlight => return Ok(()),
        RequestDisposition::OutOfWindow { lowest, highest } => {
            node.count_request(zone, ErrorCode::SeqOutOfWindow);
            let msg = format!(
                "seq_id {} outside the window {lowest}..={highest}",
                request.seq_id
            );
            reply(error_response(
                &request,
                zone,
                ErrorCode::SeqOutOfWindow,
                msg,
                0,
            ));
            return Ok(());
        }
        RequestDisposition::TooManyInflight { .. } => {
            node.count_request(zone, ErrorCode::TooManyInflight);
            let msg = "too many requests in flight on this session".to_string();
            reply(error_response(
                &request,
                zone,
                ErrorCode::TooManyInflight,
                msg,
                0,
            ));
            return Ok(());
        }
    }
    // Admission: node-wide request rate.
    if let Err(retry_after) = node.admit_request() {
        node.count_request(zone, ErrorCode::Overloaded);
        let ms = retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        let response = error_response(
            &request,
            zone,
            ErrorCode::Overloaded,
            format!("overloaded, retry after {ms} ms"),
            ms,
        );
        // Not executed: the session frees the seq (`is_not_executed`), so a
        // retry of it after `retry_after_ms` runs.
        entry
            .state
            .lock()
            .complete_request(response.seq_id, response.clone());
        reply(response);
        return Ok(());
    }
    let node = node.clone();
    let entry = entry.clone();
    executing.push(Box::pin(async move {
        let started = Instant::now();
        let response = node
            .handler
            .handle(&node.config.node_id, &entry.identity, &request)
            .await;
        let response = fit_frame(response, &request, node.config.server.max_frame_size);
        let code = ErrorCode::try_from(response.code).unwrap_or(ErrorCode::Internal);
        node.count_request(&entry.identity.zone, code);
        node.metrics
            .request_duration
            .with_label_values(&[&entry.identity.zone])
            .observe(started.elapsed().as_secs_f64());
        response
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(payload_len: usize) -> ClientResponse {
        ClientResponse {
            msg_id: 7,
            seq_id: 3,
            payload: vec![1u8; payload_len],
            zone: "002".into(),
            ..Default::default()
        }
    }

    /// An answer that fits the frame limit goes out as is; one that does not
    /// becomes FRAME_TOO_LARGE (same msg_id and seq_id) and fits.
    #[test]
    fn oversized_answers_become_frame_too_large() {
        let request = ClientRequest {
            msg_id: 7,
            seq_id: 3,
            ..Default::default()
        };
        let max = 4096;
        let small = fit_frame(answer(100), &request, max);
        assert_eq!(small, answer(100));
        let fits = |r: &ClientResponse| {
            let mut buf = BytesMut::new();
            frame::encode(&env(Body::Response(r.clone())), &mut buf);
            let mut d = frame::FrameDecoder::new(max);
            d.extend(&buf);
            d.next_frame().is_ok()
        };
        // The limit is exact: the largest answer that fits passes unchanged.
        let mut largest = 0;
        for len in 4000..4096 {
            if fits(&answer(len)) {
                largest = len;
            }
        }
        assert_eq!(fit_frame(answer(largest), &request, max), answer(largest));
        let big = fit_frame(answer(largest + 1), &request, max);
        assert_eq!(big.code, ErrorCode::FrameTooLarge as i32);
        assert_eq!((big.msg_id, big.seq_id, big.zone.as_str()), (7, 3, "002"));
        assert!(big.message.contains("4096"), "{}", big.message);
        assert!(fits(&big));
    }
}
