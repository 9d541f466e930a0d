//! A raw-frame session that survives its node: it detects a dead connection by the QUIC idle
//! timeout it asks for (`detect`, with keep-alives at a third of it), reconnects on its own to
//! another node of its address list (or to a GoAway target), resumes with its session id and
//! last ack, and records what happened: every Start (time, status, node), every connection
//! loss, every push (seq order, application-level duplicates by content), and answers requests
//! across reconnects (re-sent with the same seq when the session resumed, failed when a new
//! session replaced it: the outcome of a request sent on a lost session is unknown).
//!
//! Used by `failover` and `load`; the other scenarios keep the simpler `client::Conn`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use gatesvr_proto::client::{
    ClientAck, ClientRequest, ClientResponse, Envelope, ErrorCode, HeartbeatRequest, ResumeStatus,
    StartRequest, StartResponse, envelope::Body,
};
use gatesvr_proto::frame::{self, FrameDecoder};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::Net;
use crate::util::{now_ns, token};

/// Client transport: QUIC idle timeout `detect` (the lower of both peers' applies, so this is
/// how long a crashed node goes unnoticed), keep-alives at a third of it.
pub fn quic_config(ca: &Path, detect: Duration) -> Result<ClientQuic> {
    let mut tls = gatesvr_common::tls::client_config(ca).context("client TLS")?;
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let verifier = crate::client::CountingVerifier::new(ca)?;
    let full_handshakes = verifier.full.clone();
    tls.dangerous().set_certificate_verifier(verifier);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .keep_alive_interval(Some(detect / 3))
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(detect)?));
    Ok(ClientQuic {
        tls,
        transport: Arc::new(transport),
        tickets_offered: Arc::default(),
        full_handshakes,
    })
}

/// The client side of QUIC, from which each session makes its own `quinn::ClientConfig`: a
/// real client keeps its own TLS session tickets (the SDK: one config per `Client`), so after a
/// crash it resumes its TLS session on the node it moves to when the nodes share ticket keys
/// (the Helm chart's default, `server.shared_keys_dir`). One config for every session would
/// share rustls's small ticket cache (a few tickets per server name) among a thousand clients.
#[derive(Clone)]
pub struct ClientQuic {
    tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
    /// TLS 1.3 tickets offered by every session's handshakes (resumption attempts; a server
    /// that cannot decrypt one falls back to a full handshake).
    pub tickets_offered: Arc<std::sync::atomic::AtomicU64>,
    /// Handshakes in which a server certificate was verified: full ones (a resumed TLS 1.3
    /// handshake carries no certificate). Every session's config shares the verifier, as
    /// rustls requires for a ticket to be offered at all.
    pub full_handshakes: Arc<std::sync::atomic::AtomicU64>,
}

impl ClientQuic {
    /// A config with a ticket store of its own.
    pub fn for_session(&self) -> Result<quinn::ClientConfig> {
        let mut tls = self.tls.clone();
        tls.resumption = rustls::client::Resumption::store(crate::client::CountingStore::sharing(
            TICKETS_PER_SESSION,
            self.tickets_offered.clone(),
        ));
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        quic.transport_config(self.transport.clone());
        Ok(quic)
    }
}

/// Server names a session's ticket store remembers (one: every node is `localhost` here).
const TICKETS_PER_SESSION: usize = 4;

/// Where a session may connect.
#[derive(Clone)]
pub enum Endpoints {
    Fixed(Arc<Vec<SocketAddr>>),
    /// Re-read for every connection (a target's `--target-quic-file`).
    Target(Arc<crate::target::Target>),
}

impl Endpoints {
    fn list(&self) -> Vec<SocketAddr> {
        match self {
            Endpoints::Fixed(l) => l.as_ref().clone(),
            Endpoints::Target(t) => t.quic_now(),
        }
    }
}

pub struct SessionConfig {
    pub net: Arc<Net>,
    pub quic: ClientQuic,
    pub endpoints: Endpoints,
    pub connect_timeout: Duration,
}

/// One Start answered by a node.
#[derive(Debug, Clone)]
#[allow(dead_code)] // node_id: kept for debugging output
pub struct Started {
    pub t_ns: u64,
    pub status: ResumeStatus,
    pub node_id: String,
    pub addr: SocketAddr,
    /// UDP bytes received on the connection until the StartResponse.
    pub rx_bytes: u64,
    /// When the attempt that got this answer began (ns), and when its QUIC handshake was done:
    /// a reconnect is (earlier failed attempts) + handshake + Start on the node.
    pub attempt_ns: u64,
    pub connected_ns: u64,
}

/// What one session saw.
#[derive(Debug, Default)]
pub struct Record {
    pub session_id: String,
    pub node_id: String,
    /// Highest push seq received (and acked) on the current session.
    pub last_seq: u64,
    pub starts: Vec<Started>,
    /// When each connection was found lost (idle timeout, reset, stream end), ns.
    pub losses: Vec<u64>,
    /// Why each connection in `losses` was found lost (the same order).
    pub loss_reasons: Vec<String>,
    pub failed_attempts: u64,
    /// Why Start attempts failed (the error's text, first line) and when (ns).
    pub failures: Vec<(u64, String)>,
    pub goaways: u64,
    /// Pushes whose content is a number: content -> times delivered.
    pub seen: HashMap<u64, u32>,
    pub delivered: u64,
    /// Seqs skipped on one session (must be 0; a TRIMMED resume is counted apart).
    pub gaps: u64,
    /// Seqs received twice on one session.
    pub seq_dups: u64,
    /// The same content delivered again, flagged `redelivery` by the gateway (at-least-once
    /// after a crash: the ack of the first copy may not have reached the replica).
    pub redelivered_dups: u64,
    /// The same content delivered again without the flag.
    pub unflagged_dups: u64,
    pub trimmed: u64,
    /// (arrival ns, latency ns) of pushes carrying a send timestamp (msg_type "bench").
    pub push_lat: Vec<(u64, u64)>,
    /// The connection of the last answered Start (kept after it is lost, until the next one):
    /// its RTT estimate and packet counts show why a dead node took long to notice.
    pub conn: Option<quinn::Connection>,
}

impl Record {
    fn on_push(&mut self, p: &gatesvr_proto::client::ServerPush, t: u64) {
        if p.seq_id <= self.last_seq {
            self.seq_dups += 1;
            return;
        }
        if p.seq_id > self.last_seq + 1 {
            self.gaps += p.seq_id - self.last_seq - 1;
        }
        self.last_seq = p.seq_id;
        self.delivered += 1;
        if let Ok(k) = p.content.parse::<u64>() {
            let n = self.seen.entry(k).or_insert(0);
            *n += 1;
            if *n > 1 {
                if p.redelivery {
                    self.redelivered_dups += 1;
                } else {
                    self.unflagged_dups += 1;
                }
            }
        }
        if p.msg_type == "bench" && p.data.len() >= 8 {
            let sent = u64::from_le_bytes(p.data[..8].try_into().expect("8 bytes"));
            self.push_lat.push((t, t.saturating_sub(sent)));
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone)]
pub enum RequestFailure {
    /// The gateway answered with an error code.
    Code(ErrorCode, String),
    /// No answer within the deadline.
    Timeout,
    /// Sent on a session that a new one replaced (owner crashed): it may or may not have run.
    OutcomeUnknown,
    Stopped,
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestFailure::Code(c, m) => write!(f, "{c:?}: {m}"),
            RequestFailure::Timeout => write!(f, "timeout"),
            RequestFailure::OutcomeUnknown => write!(f, "outcome unknown (session replaced)"),
            RequestFailure::Stopped => write!(f, "stopped"),
        }
    }
}

type Answer = oneshot::Sender<Result<ClientResponse, RequestFailure>>;

struct Pending {
    msg_id: u32,
    payload: Vec<u8>,
    tx: Answer,
    sent: bool,
}

/// A running session (its driver task stops with `stop` or on drop).
pub struct Session {
    pub openid: String,
    pub rec: Arc<Mutex<Record>>,
    req_tx: mpsc::UnboundedSender<(u32, Vec<u8>, Answer)>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Starts the driver; the session starts on `endpoints[first % len]` (retried there until it
    /// does), later connections go to the other endpoints, from `spread` on (so sessions of a lost node spread over the rest).
    pub fn spawn(cfg: Arc<SessionConfig>, openid: String, first: usize, spread: usize) -> Session {
        let rec = Arc::new(Mutex::new(Record::default()));
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drive(
            cfg,
            openid.clone(),
            (first, spread),
            rec.clone(),
            req_rx,
            stop_rx,
        ));
        Session {
            openid,
            rec,
            req_tx,
            stop,
            task,
        }
    }

    /// Sends one request (any connection, resent across resumes) and waits for its answer.
    pub async fn request(
        &self,
        msg_id: u32,
        payload: Vec<u8>,
        deadline: Duration,
    ) -> Result<ClientResponse, RequestFailure> {
        let (tx, rx) = oneshot::channel();
        if self.req_tx.send((msg_id, payload, tx)).is_err() {
            return Err(RequestFailure::Stopped);
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RequestFailure::Stopped),
            Err(_) => Err(RequestFailure::Timeout),
        }
    }

    pub fn started(&self) -> bool {
        !self.rec.lock().starts.is_empty()
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub async fn join(self) {
        self.stop();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}

enum Ended {
    /// The connection ended without a GoAway or a stop: why.
    Lost(String),
    GoAway(Duration, Option<SocketAddr>),
    Stopped,
}

/// The next address to try: the `i`-th (round robin) of those not in `failed` (addresses whose
/// connection was lost or whose Start failed, and not answered since), so a client that
/// failed on one survivor tries the other before it goes back to the node that died; once
/// every address failed, any but the last one.
fn pick(list: &[SocketAddr], i: usize, failed: &[SocketAddr]) -> Option<SocketAddr> {
    let untried: Vec<SocketAddr> = list
        .iter()
        .copied()
        .filter(|a| !failed.contains(a))
        .collect();
    if !untried.is_empty() {
        return Some(untried[i % untried.len()]);
    }
    let others: Vec<SocketAddr> = list
        .iter()
        .copied()
        .filter(|a| Some(a) != failed.last())
        .collect();
    let from = if others.is_empty() { list } else { &others };
    (!from.is_empty()).then(|| from[i % from.len()])
}

fn encode(body: Body, buf: &mut BytesMut) {
    frame::encode(&Envelope { body: Some(body) }, buf);
}

async fn drive(
    cfg: Arc<SessionConfig>,
    openid: String,
    (first, spread): (usize, usize),
    rec: Arc<Mutex<Record>>,
    mut req_rx: mpsc::UnboundedReceiver<(u32, Vec<u8>, Answer)>,
    mut stop: watch::Receiver<bool>,
) {
    let quic = match cfg.quic.for_session() {
        Ok(q) => q,
        Err(e) => {
            rec.lock()
                .failures
                .push((now_ns(), format!("client config: {e}")));
            return;
        }
    };
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut next_seq = 1u64;
    let mut attempt = 0u32;
    // Addresses lost or failed, until a Start on them is answered.
    let mut failed: Vec<SocketAddr> = Vec::new();
    let mut preferred: Option<SocketAddr> = None;
    let mut first_try = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let list = cfg.endpoints.list();
        let Some(addr) = preferred.take().or_else(|| {
            if first_try {
                list.get(first % list.len().max(1)).copied()
            } else {
                pick(&list, spread + attempt as usize, &failed)
            }
        }) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (session_id, last_acked) = {
            let r = rec.lock();
            (r.session_id.clone(), r.last_seq)
        };
        let attempt_ns = now_ns();
        let opened = tokio::select! {
            r = tokio::time::timeout(
                cfg.connect_timeout,
                open(&cfg, &quic, addr, &openid, &session_id, last_acked, next_seq - 1),
            ) => r.map_err(|_| anyhow::anyhow!("connect timed out")).and_then(|r| r),
            _ = stop.changed() => break,
        };
        let (link, send, recv, decoder, ok, rx_bytes, connected_ns) = match opened {
            Ok(c) => c,
            Err(e) => {
                {
                    let mut r = rec.lock();
                    r.failed_attempts += 1;
                    let why = format!("{addr}: {e}");
                    r.failures
                        .push((now_ns(), why.lines().next().unwrap_or("").to_string()));
                }
                failed.retain(|a| *a != addr);
                failed.push(addr);
                let backoff = Duration::from_millis(20u64 << attempt.min(5));
                attempt += 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        attempt = 0;
        // Only this address is known good again: a node lost earlier stays behind the others
        // until it is tried and answers (a second loss must not send the client to a dead node).
        failed.retain(|a| *a != addr);
        // The first session start goes to its first address only (a scenario puts sessions on
        // one node on purpose); reconnects go anywhere.
        first_try = false;
        // Apply the StartResponse.
        let status = ResumeStatus::try_from(ok.resume_status).unwrap_or(ResumeStatus::New);
        {
            let mut r = rec.lock();
            let same = !session_id.is_empty() && ok.session_id == session_id;
            if !same {
                r.last_seq = 0;
                let old = std::mem::take(&mut pending);
                next_seq = 1;
                for (_, p) in old {
                    if p.sent {
                        let _ = p.tx.send(Err(RequestFailure::OutcomeUnknown));
                    } else {
                        pending.insert(next_seq, p);
                        next_seq += 1;
                    }
                }
            }
            if status == ResumeStatus::Trimmed && ok.first_available_seq_id > r.last_seq + 1 {
                r.trimmed += ok.first_available_seq_id - r.last_seq - 1;
                r.last_seq = ok.first_available_seq_id - 1;
            }
            r.session_id = ok.session_id.clone();
            r.node_id = ok.node_id.clone();
            r.conn = Some(link.conn.clone());
            r.starts.push(Started {
                t_ns: now_ns(),
                status,
                node_id: ok.node_id.clone(),
                addr,
                rx_bytes,
                attempt_ns,
                connected_ns,
            });
        }
        let heartbeat = Duration::from_millis(u64::from(ok.heartbeat_interval_ms.max(100)));
        let ended = serve(
            &link,
            send,
            recv,
            decoder,
            heartbeat,
            &rec,
            &mut pending,
            &mut next_seq,
            &mut req_rx,
            &mut stop,
        )
        .await;
        match ended {
            Ended::Stopped => {
                link.conn.close(0u32.into(), b"bench done");
                break;
            }
            Ended::Lost(why) => {
                let mut r = rec.lock();
                r.losses.push(now_ns());
                r.loss_reasons.push(why);
                drop(r);
                failed.push(addr);
            }
            Ended::GoAway(delay, target) => {
                rec.lock().goaways += 1;
                link.conn.close(0u32.into(), b"goaway");
                preferred = target;
                failed.push(addr);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    for (_, p) in pending {
        let _ = p.tx.send(Err(RequestFailure::Stopped));
    }
}

/// The connection, its stream and decoder, the StartResponse, the UDP bytes received until it
/// (a resumed TLS handshake carries no certificate chain), and when the handshake was done (ns).
type Opened = (
    crate::client::Link,
    quinn::SendStream,
    quinn::RecvStream,
    FrameDecoder,
    StartResponse,
    u64,
    u64,
);

async fn open(
    cfg: &SessionConfig,
    quic: &quinn::ClientConfig,
    addr: SocketAddr,
    openid: &str,
    session_id: &str,
    last_acked: u64,
    last_request: u64,
) -> Result<Opened> {
    let link = cfg.net.link(addr, quic).await?;
    let conn = link.conn.clone();
    let connected_ns = now_ns();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = BytesMut::new();
    encode(
        Body::Start(StartRequest {
            openid: openid.into(),
            auth_token: token(openid),
            session_id: session_id.into(),
            last_acked_seq_id: if session_id.is_empty() { 0 } else { last_acked },
            last_request_seq_id: last_request,
            client_version: "gate-bench".into(),
            ..Default::default()
        }),
        &mut buf,
    );
    send.write_all(&buf).await?;
    let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
    loop {
        if let Some(f) = decoder.next_frame()? {
            match f.body {
                Some(Body::StartOk(ok)) => {
                    let rx = conn.stats().udp_rx.bytes;
                    return Ok((link, send, recv, decoder, ok, rx, connected_ns));
                }
                other => bail!("expected StartResponse, got {other:?}"),
            }
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(c) => decoder.extend(&c.bytes),
            None => bail!("stream ended before StartResponse"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    link: &crate::client::Link,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    heartbeat: Duration,
    rec: &Mutex<Record>,
    pending: &mut BTreeMap<u64, Pending>,
    next_seq: &mut u64,
    req_rx: &mut mpsc::UnboundedReceiver<(u32, Vec<u8>, Answer)>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let conn = &link.conn;
    let mut buf = BytesMut::new();
    // Everything pending goes (again) on this connection, in seq order.
    for (seq, p) in pending.iter_mut() {
        p.sent = true;
        encode(
            Body::Request(ClientRequest {
                msg_id: p.msg_id,
                seq_id: *seq,
                payload: p.payload.clone(),
                ..Default::default()
            }),
            &mut buf,
        );
    }
    let mut hb = tokio::time::interval(heartbeat);
    hb.tick().await;
    // Frames that came with the StartResponse first.
    let mut readable = true;
    loop {
        if readable {
            readable = false;
            let t = now_ns();
            let mut acked = None;
            loop {
                let f = match decoder.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Ended::Lost(format!("bad frame: {e}")),
                };
                match f.body {
                    Some(Body::Push(p)) => {
                        let mut r = rec.lock();
                        r.on_push(&p, t);
                        acked = Some(r.last_seq);
                    }
                    Some(Body::Response(resp)) => {
                        if let Some(p) = pending.remove(&resp.seq_id) {
                            let code =
                                ErrorCode::try_from(resp.code).unwrap_or(ErrorCode::Internal);
                            let _ = p.tx.send(if code == ErrorCode::Ok {
                                Ok(resp)
                            } else {
                                Err(RequestFailure::Code(code, resp.message))
                            });
                        }
                    }
                    Some(Body::GoAway(g)) => {
                        return Ended::GoAway(
                            Duration::from_millis(u64::from(g.reconnect_delay_ms)),
                            g.target_addr.parse().ok(),
                        );
                    }
                    _ => {}
                }
            }
            if let Some(a) = acked {
                encode(Body::Ack(ClientAck { acked_seq_id: a }), &mut buf);
            }
        }
        if !buf.is_empty() {
            if let Err(e) = send.write_all(&buf).await {
                return Ended::Lost(format!("write: {e}"));
            }
            buf.clear();
        }
        tokio::select! {
            chunk = recv.read_chunk(256 * 1024, true) => match chunk {
                Ok(Some(c)) => {
                    decoder.extend(&c.bytes);
                    readable = true;
                }
                Ok(None) => return Ended::Lost("stream finished".into()),
                Err(e) => return Ended::Lost(format!("read: {e}")),
            },
            req = req_rx.recv() => match req {
                Some((msg_id, payload, tx)) => {
                    let seq = *next_seq;
                    *next_seq += 1;
                    encode(
                        Body::Request(ClientRequest {
                            msg_id,
                            seq_id: seq,
                            payload: payload.clone(),
                            ..Default::default()
                        }),
                        &mut buf,
                    );
                    pending.insert(seq, Pending { msg_id, payload, tx, sent: true });
                }
                None => return Ended::Stopped,
            },
            _ = hb.tick() => encode(
                Body::Heartbeat(HeartbeatRequest { client_timestamp: 0 }),
                &mut buf,
            ),
            _ = stop.changed() => return Ended::Stopped,
            e = conn.closed() => return Ended::Lost(format!("closed: {e}")),
            // As the SDK: a refusal is answered with a probe; a second one before any
            // datagram came back means the node's process is gone.
            () = refused(link) => {
                if link.refusals.as_ref().is_some_and(|r| r.gone()) {
                    conn.close(0u32.into(), b"node unreachable");
                    return Ended::Lost("refused twice, nothing received".into());
                }
                encode(Body::Heartbeat(HeartbeatRequest { client_timestamp: 0 }), &mut buf);
            }
        }
    }
}

/// Resolves on the next refusal of the link's connected socket (never on a shared one).
async fn refused(link: &crate::client::Link) {
    match &link.refusals {
        Some(r) => r.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_survivor_sends_the_client_to_the_other_survivor_not_the_dead_node() {
        let a: Vec<SocketAddr> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Lost a (dead), then failed on b: only c is untried, whatever the rotation.
        for i in 0..6 {
            assert_eq!(pick(&a, i, &[a[0], a[1]]), Some(a[2]));
        }
        // Everything failed: anything but the last failure.
        for i in 0..6 {
            assert_ne!(pick(&a, i, &[a[0], a[1], a[2]]), Some(a[2]));
        }
        // Nothing failed yet: round robin over all.
        assert_eq!(pick(&a, 4, &[]), Some(a[1]));
    }
}
