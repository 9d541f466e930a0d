//! [`Client`] and its connection driver.
//!
//! One background task owns the QUIC connection. The [`Client`] handle talks to
//! it through shared state guarded by a mutex plus a [`Notify`]:
//!
//! ```text
//!  Client::request ──> pending[seq] + outbox ──wake──> driver ──frames──> gateway
//!  Client::next_event <── events channel <── driver <──frames── gateway
//!  (consuming a push raises ack_point; the driver sends ClientAck)
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gatesvr_proto::client::{
    ClientAck, ClientRequest, Envelope, ErrorCode, HeartbeatRequest, ResumeStatus, StartRequest,
    StartResponse, StopRequest, envelope::Body,
};
use gatesvr_proto::frame::{self, FrameDecoder};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::ClientConfig;
use crate::error::{ClientError, RequestError};

/// A successful answer (gateway code OK). `app_code` is the upstream's own status.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub msg_id: u32,
    pub seq_id: u64,
    pub payload: Bytes,
    pub zone: String,
    pub app_code: i32,
    pub message: String,
}

/// A server push, delivered once, in seq order.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub seq_id: u64,
    pub msg_type: String,
    pub content: String,
    pub data: Bytes,
    pub created_at_ms: i64,
    /// The gateway had sent this seq before (the SDK still delivers it once).
    pub redelivery: bool,
}

/// What the client tells the application, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Push(Push),
    /// A (re)connection started or resumed a session.
    Connected {
        session_id: String,
        node_id: String,
        zone: String,
        status: ResumeStatus,
    },
    /// A reconnect could not resume the previous session: pushes after
    /// `last_acked_seq_id` that the old session held are gone (`status` says
    /// why). For `Trimmed` the session continues from `first_available_seq_id`.
    ResumeFailed {
        status: ResumeStatus,
        last_acked_seq_id: u64,
        first_available_seq_id: u64,
    },
    /// The connection dropped; the client reconnects unless told otherwise.
    Disconnected {
        code: Option<ErrorCode>,
        reason: String,
    },
    /// The server asked the client to reconnect (drain).
    GoAway {
        reconnect_delay_ms: u32,
        target_addr: String,
    },
}

struct Pending {
    msg_id: u32,
    payload: Bytes,
    tx: Option<oneshot::Sender<Result<Response, RequestError>>>,
    /// Sent on some connection at least once.
    sent: bool,
}

#[derive(Default)]
struct State {
    session_id: String,
    node_id: String,
    zone: String,
    next_request_seq: u64,
    pending: BTreeMap<u64, Pending>,
    /// Seqs to (re)send on the current connection, in order.
    outbox: VecDeque<u64>,
    /// Highest push seq handed to the events channel.
    last_delivered: u64,
    /// Highest push seq the application consumed (what we ack).
    ack_point: u64,
    /// Session of the last `Connected` event the application consumed:
    /// pushes it takes are acked only if they belong to the current session
    /// (pushes of an old session may still sit in the events channel after a
    /// reconnect started a new one; their seqs mean nothing to it).
    consumer_session: String,
    /// Highest ack written on the current connection.
    ack_sent: u64,
    stop: bool,
    closed: Option<ClientError>,
    /// Where the next (re)connect goes; starts as the configured address.
    addr: Option<SocketAddr>,
}

struct Shared {
    config: ClientConfig,
    state: Mutex<State>,
    /// Something to send (request, ack, stop).
    wake: Notify,
    /// Drop the connection (simulate_disconnect, reconnect_to).
    kill: Notify,
    /// Set with each `kill` notification, cleared when a connection opens:
    /// a request made while reconnecting must not drop the next connection.
    kill_pending: std::sync::atomic::AtomicBool,
}

/// A connected GateSvr client. Cheap to share behind an `Arc`.
pub struct Client {
    shared: Arc<Shared>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    driver: Option<tokio::task::JoinHandle<()>>,
}

impl Client {
    /// Connects, authenticates and starts a session. Fails if the first
    /// attempt fails; later disconnects are retried in the background.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        gatesvr_common::tls::install_crypto_provider();
        let quic = quic_client_config(&config)?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State {
                next_request_seq: 1,
                ..State::default()
            }),
            wake: Notify::new(),
            kill: Notify::new(),
            kill_pending: std::sync::atomic::AtomicBool::new(false),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut conn = Connection::open(&shared, &quic, shared.config.addr, &events_tx).await?;
        let driver_shared = shared.clone();
        let driver = tokio::spawn(async move {
            drive(driver_shared, quic, &mut conn, events_tx).await;
        });
        Ok(Client {
            shared,
            events: tokio::sync::Mutex::new(events_rx),
            driver: Some(driver),
        })
    }

    pub fn session_id(&self) -> String {
        self.shared.state.lock().session_id.clone()
    }

    pub fn zone(&self) -> String {
        self.shared.state.lock().zone.clone()
    }

    pub fn node_id(&self) -> String {
        self.shared.state.lock().node_id.clone()
    }

    /// Highest push seq consumed (and so acked) by the application.
    pub fn last_acked_seq_id(&self) -> u64 {
        self.shared.state.lock().ack_point
    }

    /// Sends one request and waits for its answer.
    pub async fn request(
        &self,
        msg_id: u32,
        payload: impl Into<Bytes>,
    ) -> Result<Response, RequestError> {
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut st = self.shared.state.lock();
            if st.closed.is_some() {
                return Err(RequestError::Closed);
            }
            let seq = st.next_request_seq;
            st.next_request_seq += 1;
            st.pending.insert(
                seq,
                Pending {
                    msg_id,
                    payload: payload.into(),
                    tx: Some(tx),
                    sent: false,
                },
            );
            st.outbox.push_back(seq);
            seq
        };
        self.shared.wake.notify_one();
        match tokio::time::timeout(self.shared.config.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::Closed),
            Err(_) => {
                self.shared.state.lock().pending.remove(&seq);
                Err(RequestError::Timeout)
            }
        }
    }

    /// The next event; pushes are acked once returned here. `None` once the
    /// client is closed and every event was consumed.
    pub async fn next_event(&self) -> Option<Event> {
        let event = self.events.lock().await.recv().await?;
        if let Event::Connected { session_id, .. } = &event {
            self.shared.state.lock().consumer_session = session_id.clone();
        }
        if let Event::Push(push) = &event {
            let mut st = self.shared.state.lock();
            if st.consumer_session == st.session_id && push.seq_id > st.ack_point {
                st.ack_point = push.seq_id;
            }
            drop(st);
            self.shared.wake.notify_one();
        }
        Some(event)
    }

    /// Why the client closed, if it did.
    pub fn closed(&self) -> Option<ClientError> {
        self.shared.state.lock().closed.clone()
    }

    /// Ends the session for good (StopRequest) and closes the connection.
    pub async fn stop(mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(driver) = self.driver.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
        }
    }

    /// Drops the current connection abruptly without ending the session, as
    /// a network loss would. The client reconnects and resumes. A test hook:
    /// only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub fn simulate_disconnect(&self) {
        self.shared
            .kill_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.kill.notify_one();
    }

    /// Drops the connection and resumes the session on the gateway at `addr`
    /// (as when a load balancer sends a reconnect to another node). Later
    /// reconnects go there too.
    pub fn reconnect_to(&self, addr: SocketAddr) {
        self.shared.state.lock().addr = Some(addr);
        self.shared
            .kill_pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.kill.notify_one();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let ca = config
        .ca_file
        .as_ref()
        .ok_or_else(|| ClientError::Setup("a CA file is required to verify the gateway".into()))?;
    let mut tls =
        gatesvr_common::tls::client_config(ca).map_err(|e| ClientError::Setup(e.to_string()))?;
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    let idle = quinn::IdleTimeout::try_from(config.liveness_timeout)
        .map_err(|_| ClientError::Setup("liveness_timeout is too long".into()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.liveness_timeout / 3));
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}

fn env(body: Body) -> Envelope {
    Envelope { body: Some(body) }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Codes after which reconnecting cannot help.
fn is_terminal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unauthenticated
            | ErrorCode::TokenExpired
            | ErrorCode::OpenidMismatch
            | ErrorCode::SessionReplaced
            | ErrorCode::SessionClosed
    )
}

/// One live QUIC connection with a started session.
struct Connection {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    heartbeat: Duration,
    /// Keeps the UDP socket alive; each connection gets its own socket so a
    /// load balancer routes the reconnect afresh.
    /// What the kernel reports of the gateway's port (ICMP port unreachable).
    refusals: Arc<crate::socket::Refusals>,
    _endpoint: quinn::Endpoint,
}

/// Why a connection is given up when the gateway's host refuses its datagrams.
const UNREACHABLE: &str =
    "gateway unreachable: its host refused the datagrams (no process on the port)";

/// Why a connection ended, as seen by the driver.
enum Ended {
    /// Reconnect (after `delay`, to `target` if set).
    Reconnect {
        code: Option<ErrorCode>,
        reason: String,
        delay: Option<Duration>,
        target: Option<SocketAddr>,
        /// The gateway stopped answering: move on to the next address.
        rotate: bool,
    },
    /// Do not reconnect.
    Terminal(ClientError),
}

impl Connection {
    /// Connects to `addr`, sends Start (resuming if we have a session) and
    /// processes the StartResponse.
    async fn open(
        shared: &Arc<Shared>,
        quic: &quinn::ClientConfig,
        addr: SocketAddr,
        events: &mpsc::UnboundedSender<Event>,
    ) -> Result<Connection, ClientError> {
        let cfg = &shared.config;
        let connect_err = |reason: String| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let (mut endpoint, refusals) = crate::socket::connected_endpoint(addr)
            .map_err(|e| ClientError::Setup(format!("UDP socket: {e}")))?;
        endpoint.set_default_client_config(quic.clone());
        let attempt = async {
            let conn = endpoint
                .connect(addr, &cfg.server_name)
                .map_err(|e| connect_err(e.to_string()))?
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let (session_id, last_acked, last_request) = {
                let st = shared.state.lock();
                (
                    st.session_id.clone(),
                    st.ack_point,
                    st.next_request_seq.saturating_sub(1),
                )
            };
            let start = env(Body::Start(StartRequest {
                openid: cfg.openid.clone(),
                auth_token: (cfg.token)(),
                last_acked_seq_id: if session_id.is_empty() { 0 } else { last_acked },
                session_id: session_id.clone(),
                resume_token: String::new(),
                client_version: concat!("gatesvr-sdk-rust/", env!("CARGO_PKG_VERSION")).into(),
                last_request_seq_id: last_request,
            }));
            let mut buf = BytesMut::new();
            frame::encode(&start, &mut buf);
            send.write_all(&buf)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            // A server may announce any max_frame_size up to 16 MiB (its
            // pushes and answers never exceed what it announced): accept that
            // much, not only the 1 MiB default, or a node configured higher
            // would break this client's stream with its first large push.
            let mut decoder = FrameDecoder::new(MAX_SERVER_FRAME_SIZE);
            let first = loop {
                match decoder.next_frame() {
                    Ok(Some(f)) => break f,
                    Ok(None) => {}
                    Err(e) => return Err(connect_err(format!("bad frame from gateway: {e}"))),
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
                    Ok(None) | Err(_) => {
                        return Err(match close_code(&conn) {
                            Some((code, reason)) if is_terminal(code) => ClientError::Refused {
                                code,
                                message: reason,
                            },
                            Some((code, reason)) => connect_err(format!("{code:?}: {reason}")),
                            None => connect_err("connection closed before StartResponse".into()),
                        });
                    }
                }
            };
            let start_ok = match first.body {
                Some(Body::StartOk(ok)) => ok,
                Some(Body::Error(e)) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                    return Err(if is_terminal(code) {
                        ClientError::Refused {
                            code,
                            message: e.message,
                        }
                    } else {
                        connect_err(format!("{code:?}: {}", e.message))
                    });
                }
                _ => {
                    return Err(connect_err(
                        "gateway sent something other than StartResponse".into(),
                    ));
                }
            };
            // Keep this decoder: pushes may already follow the StartResponse
            // in the bytes it buffered.
            Ok((conn, send, recv, decoder, start_ok, session_id, last_acked))
        };
        // An Initial refused by the address's host: nobody listens there (a spoofed ICMP
        // costs one attempt, which the reconnect loop repeats).
        let refused = async {
            loop {
                let changed = refusals.changed();
                if refusals.suspected() {
                    return connect_err(UNREACHABLE.into());
                }
                changed.await;
            }
        };
        let (conn, send, recv, decoder, ok, old_session, last_acked) = tokio::select! {
            r = tokio::time::timeout(cfg.connect_timeout, attempt) => {
                r.map_err(|_| connect_err("timed out".into()))??
            }
            e = refused => return Err(e),
        };
        apply_start(shared, &ok, &old_session, last_acked, events);
        Ok(Connection {
            conn,
            send,
            recv,
            decoder,
            heartbeat: Duration::from_millis(u64::from(ok.heartbeat_interval_ms.max(100))),
            refusals,
            _endpoint: endpoint,
        })
    }
}

/// The largest `max_frame_size` a GateSvr node accepts in its config.
const MAX_SERVER_FRAME_SIZE: usize = 16 << 20;

fn close_code(conn: &quinn::Connection) -> Option<(ErrorCode, String)> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner())
                .ok()
                .and_then(|c| ErrorCode::try_from(c as i32).ok())
                .unwrap_or(ErrorCode::Internal);
            Some((code, String::from_utf8_lossy(&close.reason).into_owned()))
        }
        _ => None,
    }
}

/// Updates the shared state from a StartResponse and reports it.
fn apply_start(
    shared: &Shared,
    ok: &StartResponse,
    old_session: &str,
    last_acked: u64,
    events: &mpsc::UnboundedSender<Event>,
) {
    let status = ResumeStatus::try_from(ok.resume_status).unwrap_or(ResumeStatus::New);
    let mut st = shared.state.lock();
    let same_session = !old_session.is_empty() && ok.session_id == old_session;
    if !same_session {
        // A new session (NEW, SESSION_EXPIRED, SEQ_AHEAD, or RECOVERED: the
        // owner crashed and the durable pushes after our ack were rebuilt
        // into a new session, renumbered from 1, redelivered; non-durable ones
        // may be lost): its push seqs and request seqs start over. Requests
        // already sent on the old session may have run: fail them rather than
        // risk running them twice; unsent ones are renumbered and sent.
        st.last_delivered = 0;
        st.ack_point = 0;
        let old = std::mem::take(&mut st.pending);
        let mut next = 1;
        for (_, mut p) in old {
            if p.sent {
                if let Some(tx) = p.tx.take() {
                    let _ = tx.send(Err(RequestError::OutcomeUnknown));
                }
            } else {
                st.pending.insert(next, p);
                next += 1;
            }
        }
        st.next_request_seq = next;
    }
    if status == ResumeStatus::Trimmed && ok.first_available_seq_id > st.last_delivered + 1 {
        // Pushes before first_available are gone (reported below): continue after them.
        st.last_delivered = ok.first_available_seq_id - 1;
        st.ack_point = st.ack_point.max(st.last_delivered);
    }
    st.session_id = ok.session_id.clone();
    st.node_id = ok.node_id.clone();
    st.zone = ok.zone.clone();
    st.ack_sent = st.ack_point;
    // Everything pending is (re)sent on this connection, in seq order.
    st.outbox = st.pending.keys().copied().collect();
    drop(st);
    if !old_session.is_empty() && status != ResumeStatus::Resumed {
        let _ = events.send(Event::ResumeFailed {
            status,
            last_acked_seq_id: last_acked,
            first_available_seq_id: ok.first_available_seq_id,
        });
    }
    let _ = events.send(Event::Connected {
        session_id: ok.session_id.clone(),
        node_id: ok.node_id.clone(),
        zone: ok.zone.clone(),
        status,
    });
}

/// Runs connections until the client stops or reconnecting is pointless.
async fn drive(
    shared: Arc<Shared>,
    quic: quinn::ClientConfig,
    first: &mut Connection,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut current: Option<Connection> = None;
    // Serve the first connection (owned by the caller's frame) then our own.
    let mut ended = serve(&shared, first, &events).await;
    let mut failures = 0u32;
    loop {
        let (delay, target) = match ended {
            Ended::Terminal(err) => {
                finish(&shared, err);
                return;
            }
            Ended::Reconnect {
                code,
                reason,
                delay,
                target,
                rotate,
            } => {
                // One Disconnected per outage, not one per failed attempt.
                if failures == 0 {
                    let _ = events.send(Event::Disconnected {
                        code,
                        reason: reason.clone(),
                    });
                }
                if !shared.config.reconnect {
                    finish(&shared, ClientError::Closed(reason));
                    return;
                }
                if rotate {
                    let mut st = shared.state.lock();
                    let current = st.addr.unwrap_or(shared.config.addr);
                    st.addr = Some(shared.config.next_addr(current));
                }
                (delay, target)
            }
        };
        // A GoAway target becomes the address for later reconnects too.
        if let Some(t) = target {
            shared.state.lock().addr = Some(t);
        }
        let wait = delay.unwrap_or_default() + shared.config.backoff.delay(failures);
        // A `reconnect_to` cuts the wait short: it names where to go now. (Attempts that fail
        // at once, a refused Initial, grow the backoff fast.)
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                () = shared.kill.notified() => {
                    if shared.kill_pending.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                }
            }
        }
        // Whatever asked for this reconnect (reconnect_to during the wait
        // included) is served by it: read the address after clearing the flag.
        shared
            .kill_pending
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let addr = shared.state.lock().addr.unwrap_or(shared.config.addr);
        match Connection::open(&shared, &quic, addr, &events).await {
            Ok(conn) => {
                failures = 0;
                let conn = current.insert(conn);
                ended = serve(&shared, conn, &events).await;
            }
            Err(ClientError::Refused { code, message }) => {
                finish(&shared, ClientError::Refused { code, message });
                return;
            }
            Err(err) => {
                failures += 1;
                if shared
                    .config
                    .backoff
                    .max_attempts
                    .is_some_and(|m| failures >= m)
                {
                    finish(
                        &shared,
                        ClientError::Closed(format!("gave up reconnecting: {err}")),
                    );
                    return;
                }
                tracing::debug!(error = %err, attempt = failures, "reconnect failed");
                ended = Ended::Reconnect {
                    code: None,
                    reason: err.to_string(),
                    delay: None,
                    target: None,
                    rotate: true,
                };
            }
        }
    }
}

fn finish(shared: &Shared, err: ClientError) {
    let mut st = shared.state.lock();
    st.closed = Some(err);
    for (_, mut p) in std::mem::take(&mut st.pending) {
        if let Some(tx) = p.tx.take() {
            let _ = tx.send(Err(RequestError::Closed));
        }
    }
}

/// Stream segments read per wake-up, at most.
const READ_CHUNKS: usize = 32;

/// Serves one connection until it ends.
async fn serve(
    shared: &Arc<Shared>,
    c: &mut Connection,
    events: &mpsc::UnboundedSender<Event>,
) -> Ended {
    let mut heartbeat = tokio::time::interval(c.heartbeat);
    heartbeat.tick().await;
    let mut buf = BytesMut::new();
    // Every segment the stream holds is read at once (one per QUIC packet):
    // a burst of pushes is handled, and acked, once per wake-up, not once
    // per packet.
    let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
    // Frames that arrived together with the StartResponse come first.
    let mut pending_bytes = true;
    loop {
        let readable = if pending_bytes {
            pending_bytes = false;
            true
        } else {
            tokio::select! {
                read = c.recv.read_chunks(&mut chunks) => {
                    match read {
                        Ok(Some(n)) => {
                            for chunk in &mut chunks[..n] {
                                c.decoder.extend(chunk);
                                *chunk = Bytes::new();
                            }
                            true
                        }
                        Ok(None) | Err(_) => return connection_ended(c, None),
                    }
                }
                _ = heartbeat.tick() => {
                    frame::encode(&env(Body::Heartbeat(HeartbeatRequest { client_timestamp: unix_ms() })), &mut buf);
                    false
                }
                () = c.refusals.changed() => {
                    if c.refusals.gone() {
                        c.conn.close(quinn::VarInt::from_u32(0), b"gateway unreachable");
                        return Ended::Reconnect { code: None, reason: UNREACHABLE.into(), delay: None, target: None, rotate: true };
                    }
                    // One refusal: probe with something the gateway answers at once if it
                    // is there. A second refusal before any answer ends the connection.
                    frame::encode(&env(Body::Heartbeat(HeartbeatRequest { client_timestamp: unix_ms() })), &mut buf);
                    false
                }
                () = shared.wake.notified() => false,
                () = shared.kill.notified() => {
                    // A permit left by a request made while reconnecting is stale:
                    // this connection already goes where that request asked.
                    if !shared.kill_pending.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        false
                    } else {
                        c.conn.close(quinn::VarInt::from_u32(0), b"simulated disconnect");
                        return Ended::Reconnect { code: None, reason: "simulated disconnect".into(), delay: None, target: None, rotate: false };
                    }
                }
            }
        };
        if readable {
            let mut goaway = None;
            loop {
                match c.decoder.next_frame() {
                    Ok(Some(frame)) => match handle_frame(shared, frame, events) {
                        Some(Signal::GoAway(delay, target)) => goaway = Some((delay, target)),
                        Some(Signal::Gap) => {
                            c.conn
                                .close(quinn::VarInt::from_u32(0), b"gap in pushes; resuming");
                            return Ended::Reconnect {
                                code: None,
                                reason: "gap in pushes".into(),
                                delay: None,
                                target: None,
                                rotate: false,
                            };
                        }
                        None => {}
                    },
                    Ok(None) => break,
                    Err(e) => {
                        c.conn.close(
                            quinn::VarInt::from_u32(e.code() as u32),
                            b"bad frame from gateway",
                        );
                        return Ended::Reconnect {
                            code: Some(e.code()),
                            reason: e.to_string(),
                            delay: None,
                            target: None,
                            rotate: false,
                        };
                    }
                }
            }
            if let Some((delay, target)) = goaway {
                // Leave now; the session is resumed on the next connection.
                c.conn.close(quinn::VarInt::from_u32(0), b"goaway");
                return Ended::Reconnect {
                    code: Some(ErrorCode::Draining),
                    reason: "server asked to reconnect".into(),
                    delay: Some(delay),
                    target,
                    rotate: false,
                };
            }
        }
        // Collect what to send: requests, then the ack, then a stop.
        let stop = {
            let mut st = shared.state.lock();
            while let Some(seq) = st.outbox.pop_front() {
                if let Some(p) = st.pending.get_mut(&seq) {
                    p.sent = true;
                    let req = ClientRequest {
                        msg_id: p.msg_id,
                        seq_id: seq,
                        r#type: 0,
                        payload: p.payload.to_vec(),
                        openid: String::new(),
                    };
                    frame::encode(&env(Body::Request(req)), &mut buf);
                }
            }
            if st.ack_point > st.ack_sent {
                st.ack_sent = st.ack_point;
                frame::encode(
                    &env(Body::Ack(ClientAck {
                        acked_seq_id: st.ack_point,
                    })),
                    &mut buf,
                );
            }
            st.stop
        };
        if stop {
            frame::encode(
                &env(Body::Stop(StopRequest {
                    reason: "client stop".into(),
                })),
                &mut buf,
            );
        }
        if !buf.is_empty() {
            if c.send.write_all(&buf).await.is_err() {
                return connection_ended(c, None);
            }
            buf.clear();
        }
        if stop {
            let _ = c.send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.conn.closed()).await;
            c.conn.close(quinn::VarInt::from_u32(0), b"stopped");
            return Ended::Terminal(ClientError::Closed("stopped".into()));
        }
    }
}

fn connection_ended(c: &Connection, goaway: Option<(Duration, Option<SocketAddr>)>) -> Ended {
    let (delay, target) = goaway.map_or((None, None), |(d, t)| (Some(d), t));
    match close_code(&c.conn) {
        Some((code, reason)) if is_terminal(code) => Ended::Terminal(ClientError::Refused {
            code,
            message: reason,
        }),
        Some((code, reason)) => Ended::Reconnect {
            code: Some(code),
            reason,
            delay,
            target,
            rotate: false,
        },
        None => Ended::Reconnect {
            code: None,
            reason: c
                .conn
                .close_reason()
                .map_or_else(|| "stream ended".into(), |r| r.to_string()),
            delay,
            target,
            // The gateway went silent or forgot the connection (it died, or
            // a replacement reset it): try the next address.
            rotate: matches!(
                c.conn.close_reason(),
                Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
            ),
        },
    }
}

/// What a frame asks of the connection loop.
enum Signal {
    /// Reconnect after (delay), to (target) if set.
    GoAway(Duration, Option<SocketAddr>),
    /// Pushes went missing: resume to get them again.
    Gap,
}

/// Applies one frame.
fn handle_frame(
    shared: &Shared,
    frame: Envelope,
    events: &mpsc::UnboundedSender<Event>,
) -> Option<Signal> {
    match frame.body? {
        Body::Response(r) => {
            let pending = shared.state.lock().pending.remove(&r.seq_id);
            if let Some(mut p) = pending
                && let Some(tx) = p.tx.take()
            {
                let code = ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Internal);
                let result = if code == ErrorCode::Ok {
                    Ok(Response {
                        msg_id: r.msg_id,
                        seq_id: r.seq_id,
                        payload: r.payload.into(),
                        zone: r.zone,
                        app_code: r.app_code,
                        message: r.message,
                    })
                } else {
                    Err(RequestError::Gateway {
                        code,
                        message: r.message,
                        retry_after_ms: r.retry_after_ms,
                    })
                };
                let _ = tx.send(result);
            }
            None
        }
        Body::Push(p) => {
            let mut st = shared.state.lock();
            tracing::trace!(seq = p.seq_id, last_delivered = st.last_delivered, content = %p.content, "push frame");
            if p.seq_id <= st.last_delivered {
                return None; // duplicate (retransmit or resume overlap)
            }
            if p.seq_id > st.last_delivered + 1 {
                // Pushes are contiguous on a session (docs/protocol.md §6): a
                // gap means frames went missing. Do not deliver past it;
                // reconnect and resume, which redelivers from our ack point.
                tracing::warn!(
                    seq = p.seq_id,
                    expected = st.last_delivered + 1,
                    "gap in pushes; resuming"
                );
                return Some(Signal::Gap);
            }
            st.last_delivered = p.seq_id;
            drop(st);
            let _ = events.send(Event::Push(Push {
                seq_id: p.seq_id,
                msg_type: p.msg_type,
                content: p.content,
                data: p.data,
                created_at_ms: p.created_at_ms,
                redelivery: p.redelivery,
            }));
            None
        }
        Body::GoAway(g) => {
            let _ = events.send(Event::GoAway {
                reconnect_delay_ms: g.reconnect_delay_ms,
                target_addr: g.target_addr.clone(),
            });
            Some(Signal::GoAway(
                Duration::from_millis(u64::from(g.reconnect_delay_ms)),
                g.target_addr.parse().ok(),
            ))
        }
        Body::Error(e) => {
            tracing::debug!(code = e.code, message = %e.message, "gateway error frame");
            None
        }
        _ => None,
    }
}
