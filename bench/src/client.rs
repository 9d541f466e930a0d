//! The load generator's side: QUIC client endpoints, raw-frame sessions (docs/protocol.md, not
//! the SDK, so that the client costs the same against the data plane and the baselines), the
//! closed request loop, and push readers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use gatesvr_proto::client::{
    ClientAck, ClientRequest, Envelope, ErrorCode, StartRequest, StartResponse, envelope::Body,
};
use gatesvr_proto::frame::{self, FrameDecoder};
use parking_lot::Mutex;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};

use gatesvr_sdk::socket::{PeerRefusals, Refusals};

use crate::util::{Lat, now_ns, token};

/// Counts TLS 1.3 tickets the client offered (resumption attempts).
#[derive(Debug)]
pub struct CountingStore {
    inner: ClientSessionMemoryCache,
    pub offered: Arc<AtomicU64>,
}

impl CountingStore {
    pub fn new() -> Arc<Self> {
        Self::sharing(64, Arc::new(AtomicU64::new(0)))
    }

    /// A store of its own (`capacity` server names) that counts into `offered`, which other
    /// stores may share (one store per client, one count for all).
    pub fn sharing(capacity: usize, offered: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            inner: ClientSessionMemoryCache::new(capacity),
            offered,
        })
    }
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.inner.set_kx_hint(server_name, group)
    }
    fn kx_hint(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }
    fn set_tls12_session(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value)
    }
    fn tls12_session(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }
    fn remove_tls12_session(&self, server_name: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }
    fn insert_tls13_ticket(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value)
    }
    fn take_tls13_ticket(
        &self,
        server_name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let t = self.inner.take_tls13_ticket(server_name);
        if t.is_some() {
            self.offered.fetch_add(1, Ordering::Relaxed);
        }
        t
    }
}

/// The server certificate verifier of `ca`'s roots, counting its calls: rustls verifies a
/// certificate in a full handshake only, so the count is the client's own tally of full
/// handshakes (a resumed one carries no certificate).
#[derive(Debug)]
pub struct CountingVerifier {
    inner: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    pub full: Arc<AtomicU64>,
}

impl CountingVerifier {
    pub fn new(ca: &Path) -> Result<Arc<Self>> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()?;
        Ok(Arc::new(Self {
            inner,
            full: Arc::default(),
        }))
    }
}

impl rustls::client::danger::ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.full.fetch_add(1, Ordering::Relaxed);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A quinn client config trusting `ca`, ALPN gatesvr/1, the SDK's transport settings.
/// `store`: None = resumption disabled (every handshake is a full one).
pub fn client_config(ca: &Path, store: Option<Arc<CountingStore>>) -> Result<quinn::ClientConfig> {
    let mut tls = gatesvr_common::tls::client_config(ca).context("client TLS")?;
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    tls.resumption = match store {
        Some(s) => Resumption::store(s),
        None => Resumption::disabled(),
    };
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .keep_alive_interval(Some(Duration::from_secs(10)));
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}
/// A client endpoint on its own UDP socket with the data plane's receive buffer
/// (`edge::quic::UDP_RECV_BUFFER`, capped by `net.core.rmem_max`): at the kernel's default
/// (208 KiB) a socket shared by hundreds of connections drops bursts of pushes, and QUIC's loss
/// recovery then paces the sender, so the load generator would measure its own socket. The
/// socket hears which node addresses refuse its datagrams (`gatesvr_sdk::socket`).
fn client_endpoint() -> Result<(quinn::Endpoint, Arc<PeerRefusals>)> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    state.set_recv_buffer_size(
        (&socket).into(),
        gatesvr_dataplane::edge::quic::UDP_RECV_BUFFER,
    )?;
    Ok(gatesvr_sdk::socket::shared_endpoint(socket)?)
}

/// A connection and what its node's host refuses (`None`: not heard, `--client-sockets deaf`).
pub struct Link {
    pub conn: quinn::Connection,
    pub refusals: Option<Arc<Refusals>>,
    /// The connection's own endpoint (connected sockets), kept as long as the connection.
    _endpoint: Option<quinn::Endpoint>,
}

/// How a [`Net`]'s connections get their UDP sockets (`--client-sockets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// A few sockets shared by many connections (one socket per connection would run into
    /// file-descriptor limits at 50k sessions), each hearing which node addresses refuse its
    /// datagrams (`IP_RECVERR`): a crashed node is noticed as the SDK notices it.
    Shared,
    /// One socket per connection, connected to its node, as the client SDK has. Costs the load
    /// generator about twice the CPU per datagram (a quinn endpoint per connection).
    Connected,
    /// Shared sockets that ignore refusals: only the idle timeout notices a crash (clients
    /// before session 12, and other QUIC clients on unconnected sockets).
    Deaf,
}

impl std::str::FromStr for Sockets {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "shared" => Ok(Sockets::Shared),
            "connected" => Ok(Sockets::Connected),
            "deaf" => Ok(Sockets::Deaf),
            _ => Err(format!("{s}: expected shared, connected or deaf")),
        }
    }
}

/// The client side of a scenario: its sockets and TLS configuration.
pub struct Net {
    /// Shared sockets, with what each hears of each node address (empty when `Connected`).
    endpoints: Vec<(quinn::Endpoint, Arc<PeerRefusals>)>,
    sockets: Sockets,
    next: AtomicUsize,
    pub config: quinn::ClientConfig,
    /// Name checked on the server certificate (`localhost` for the run's own dev certificates).
    pub server_name: String,
}

impl Net {
    /// `sockets` shared sockets that hear refusals.
    pub fn new(ca: &Path, sockets: usize) -> Result<Self> {
        Self::with(ca, Sockets::Shared, sockets)
    }

    /// Sockets as `mode` says (`sockets` shared ones unless `Connected`).
    pub fn with(ca: &Path, mode: Sockets, sockets: usize) -> Result<Self> {
        let config = client_config(ca, None)?;
        let mut endpoints = Vec::new();
        if mode != Sockets::Connected {
            for _ in 0..sockets.max(1) {
                let (mut ep, peers) = client_endpoint()?;
                ep.set_default_client_config(config.clone());
                endpoints.push((ep, peers));
            }
        }
        Ok(Self {
            endpoints,
            sockets: mode,
            next: AtomicUsize::new(0),
            config,
            server_name: "localhost".into(),
        })
    }

    /// A connection to `addr` with `config`, and what `addr`'s host refuses (unless deaf). An
    /// Initial refused fails the attempt at once: nobody listens there.
    pub async fn link(&self, addr: SocketAddr, config: &quinn::ClientConfig) -> Result<Link> {
        let (connecting, refusals, endpoint) = if self.sockets == Sockets::Connected {
            let (endpoint, refusals) = gatesvr_sdk::socket::connected_endpoint(addr)?;
            let connecting = endpoint.connect_with(config.clone(), addr, &self.server_name)?;
            (connecting, Some(refusals), Some(endpoint))
        } else {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
            let (endpoint, peers) = &self.endpoints[i];
            let connecting = endpoint.connect_with(config.clone(), addr, &self.server_name)?;
            let refusals = (self.sockets == Sockets::Shared).then(|| peers.of(addr));
            (connecting, refusals, None)
        };
        let refused = async {
            let Some(refusals) = &refusals else {
                return std::future::pending().await;
            };
            loop {
                let changed = refusals.changed();
                if refusals.suspected() {
                    return;
                }
                changed.await;
            }
        };
        let conn = tokio::select! {
            c = connecting => c?,
            () = refused => bail!("refused: the node's host has no process on {addr}"),
        };
        Ok(Link {
            conn,
            refusals,
            _endpoint: endpoint,
        })
    }

    /// Local ports of the client sockets (their drops are in /proc/net/udp).
    pub fn local_ports(&self) -> Vec<u16> {
        self.endpoints
            .iter()
            .filter_map(|(e, _)| e.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }

    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection> {
        self.connect_with(addr, &self.config).await
    }

    pub async fn connect_with(
        &self,
        addr: SocketAddr,
        config: &quinn::ClientConfig,
    ) -> Result<quinn::Connection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Ok(self.endpoints[i]
            .0
            .connect_with(config.clone(), addr, &self.server_name)?
            .await?)
    }
}

/// One stream-carrying connection with a frame decoder.
pub struct Conn {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub decoder: FrameDecoder,
    /// Next request seq on this connection (sessions keep numbering across rounds).
    pub next_seq: u64,
}

impl Conn {
    pub async fn open(conn: quinn::Connection, prefix: &[u8]) -> Result<Self> {
        let (mut send, recv) = conn.open_bi().await?;
        if !prefix.is_empty() {
            send.write_all(prefix).await?;
        }
        Ok(Self {
            conn,
            send,
            recv,
            decoder: FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE),
            next_seq: 1,
        })
    }

    pub async fn next_frame(&mut self) -> Result<Envelope> {
        loop {
            if let Some(f) = self.decoder.next_frame()? {
                return Ok(f);
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.decoder.extend(&chunk.bytes),
                None => bail!("stream ended"),
            }
        }
    }

    pub async fn send_body(&mut self, body: Body) -> Result<()> {
        let mut buf = BytesMut::new();
        frame::encode(&Envelope { body: Some(body) }, &mut buf);
        self.send.write_all(&buf).await?;
        Ok(())
    }
}

/// Connects and starts a new session for `openid` on a data-plane node.
pub async fn dp_session(
    net: &Net,
    addr: SocketAddr,
    openid: &str,
) -> Result<(Conn, StartResponse)> {
    let conn = net.connect(addr).await?;
    dp_start(conn, openid).await
}

pub async fn dp_start(conn: quinn::Connection, openid: &str) -> Result<(Conn, StartResponse)> {
    let mut c = Conn::open(conn, &[]).await?;
    c.send_body(Body::Start(StartRequest {
        openid: openid.into(),
        auth_token: token(openid),
        client_version: "gate-bench".into(),
        ..Default::default()
    }))
    .await?;
    match c.next_frame().await?.body {
        Some(Body::StartOk(ok)) => Ok((c, ok)),
        other => bail!("expected StartResponse, got {other:?}"),
    }
}

/// How replies carry the request's seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// ClientResponse (data plane, relay).
    Response,
    /// The request echoed back (bare quinn echo).
    Echo,
}

/// Result of one closed-loop window.
#[derive(Debug, Default)]
pub struct LoopResult {
    pub lat: Lat,
    pub completed: u64,
    /// Every reply, warm-up and drain included (CPU per request divides by this).
    pub all: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

/// Closed loop on one stream: `inflight` requests outstanding; each reply sends the next.
/// Replies during `warmup` are not recorded. After the window, stops sending and drains, so
/// the connection can serve the next round.
pub async fn closed_loop(
    c: &mut Conn,
    inflight: usize,
    payload: &[u8],
    warmup: Duration,
    window: Duration,
    reply: Reply,
) -> Result<LoopResult> {
    const RING: usize = 1 << 14;
    let mut sent_at = vec![0u64; RING];
    let mut buf = BytesMut::new();
    let mut out = LoopResult::default();
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut outstanding = 0usize;
    let enc = |seq: u64, buf: &mut BytesMut| {
        frame::encode(
            &Envelope {
                body: Some(Body::Request(ClientRequest {
                    msg_id: 1,
                    seq_id: seq,
                    payload: payload.to_vec(),
                    ..Default::default()
                })),
            },
            buf,
        )
    };
    for _ in 0..inflight {
        let seq = c.next_seq;
        c.next_seq += 1;
        sent_at[seq as usize % RING] = now_ns();
        enc(seq, &mut buf);
        outstanding += 1;
    }
    c.send.write_all(&buf).await?;
    while outstanding > 0 {
        let chunk = c
            .recv
            .read_chunk(256 * 1024, true)
            .await?
            .context("stream ended during the loop")?;
        c.decoder.extend(&chunk.bytes);
        buf.clear();
        let now = Instant::now();
        let t = now_ns();
        while let Some(f) = c.decoder.next_frame()? {
            let seq = match f.body {
                Some(Body::Response(r)) if reply == Reply::Response => {
                    if r.code != ErrorCode::Ok as i32 {
                        out.errors += 1;
                    }
                    r.seq_id
                }
                Some(Body::Request(r)) if reply == Reply::Echo => r.seq_id,
                other => bail!("unexpected frame in the loop: {other:?}"),
            };
            outstanding -= 1;
            out.all += 1;
            if now >= measure_from && now < end {
                out.lat
                    .0
                    .push(t.saturating_sub(sent_at[seq as usize % RING]));
                out.completed += 1;
            }
            if now < end {
                let seq = c.next_seq;
                c.next_seq += 1;
                sent_at[seq as usize % RING] = now_ns();
                enc(seq, &mut buf);
                outstanding += 1;
            }
        }
        if !buf.is_empty() {
            c.send.write_all(&buf).await?;
        }
    }
    out.elapsed = window;
    Ok(out)
}

/// Counters shared by every push reader.
#[derive(Debug, Default)]
pub struct PushStats {
    pub delivered: AtomicU64,
    pub gaps: AtomicU64,
    pub dups: AtomicU64,
    pub redeliveries: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    pub lat: Mutex<Lat>,
}

impl PushStats {
    /// Takes the latencies and zeroes the delivery count (between rounds).
    pub fn reset(&self) -> (u64, Lat) {
        let d = self.delivered.swap(0, Ordering::Relaxed);
        let lat = std::mem::take(&mut *self.lat.lock());
        (d, lat)
    }
}

/// Reads pushes on a session (or a bare 'P' stream), checks seq order, records latency from the
/// timestamp in the first 8 bytes of `data`, and, with `ack`, acks cumulatively once per read of
/// every segment the stream holds (as the SDK acks once per read; docs/protocol.md §6 allows
/// batching). The bare baseline
/// reads with `ack` too: the same Ack frames go to the bare server's QUIC stack (which does not
/// parse them), so both sides of a comparison carry the same client traffic.
pub async fn push_reader(
    mut c: Conn,
    stats: Arc<PushStats>,
    ack: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Conn> {
    let mut last = 0u64;
    let mut stop = stop;
    let mut buf = BytesMut::new();
    let mut chunks: [bytes::Bytes; 32] = Default::default();
    // One read's latencies, kept across reads (not reallocated per read).
    let mut lats = Vec::new();
    loop {
        let read = tokio::select! {
            read = c.recv.read_chunks(&mut chunks) => read,
            _ = stop.changed() => return Ok(c),
        };
        let Some(n) = read? else {
            return Ok(c);
        };
        for chunk in &mut chunks[..n] {
            c.decoder.extend(chunk);
            *chunk = bytes::Bytes::new();
        }
        let t = now_ns();
        let mut delivered = 0;
        while let Some(f) = c.decoder.next_frame()? {
            let Some(Body::Push(p)) = f.body else {
                continue;
            };
            if p.redelivery {
                stats.redeliveries.fetch_add(1, Ordering::Relaxed);
            }
            if p.seq_id <= last {
                stats.dups.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if p.seq_id > last + 1 {
                stats.gaps.fetch_add(p.seq_id - last - 1, Ordering::Relaxed);
            }
            last = p.seq_id;
            delivered += 1;
            if p.data.len() >= 8 {
                let sent = u64::from_le_bytes(p.data[..8].try_into().expect("8 bytes"));
                lats.push(t.saturating_sub(sent));
            }
        }
        if delivered > 0 {
            stats.delivered.fetch_add(delivered, Ordering::Relaxed);
            stats.last_delivery_ns.fetch_max(t, Ordering::Relaxed);
            stats.lat.lock().0.append(&mut lats);
            if ack {
                buf.clear();
                frame::encode(
                    &Envelope {
                        body: Some(Body::Ack(ClientAck { acked_seq_id: last })),
                    },
                    &mut buf,
                );
                c.send.write_all(&buf).await?;
            }
        }
    }
}

/// Runs `f` on up to `concurrency` items at a time; returns the results in any order.
pub async fn bounded<T, F, Fut>(items: Vec<T>, concurrency: usize, f: F) -> Vec<Fut::Output>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future,
{
    use futures::StreamExt;
    futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await
}
