//! web: the browser transports (WebTransport, WebSocket) against native QUIC
//! on the same node (docs/protocol.md §12): request round trip (one session,
//! one request in flight, echo routing) and RSS per idle session, each
//! transport measured in a fresh data-plane process. The WebTransport client
//! is [`crate::wt`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use gatesvr_proto::client::{ClientRequest, Envelope, StartRequest, envelope::Body};
use gatesvr_proto::frame::{self, FrameDecoder};
use tokio_tungstenite::tungstenite::Message;

use super::Opts;
use crate::client::{Conn, Net, dp_session};
use crate::report::{Check, Cmp, Report, Round};
use crate::util::{Lat, ServerProc, progress, token};

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A session over one of the two transports.
enum Carrier {
    Quic(Conn),
    Wt(Box<crate::wt::WtConn>),
    Ws(Box<WsStream>),
}

impl Carrier {
    async fn send(&mut self, body: Body) -> Result<()> {
        match self {
            Carrier::Quic(c) => c.send_body(body).await,
            Carrier::Wt(wt) => wt.conn.send_body(body).await,
            Carrier::Ws(ws) => {
                let mut buf = BytesMut::new();
                frame::encode(&Envelope { body: Some(body) }, &mut buf);
                ws.send(Message::Binary(buf.freeze())).await?;
                Ok(())
            }
        }
    }

    async fn next(&mut self) -> Result<Envelope> {
        match self {
            Carrier::Quic(c) => c.next_frame().await,
            Carrier::Wt(wt) => wt.conn.next_frame().await,
            Carrier::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        let mut d = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_SIZE);
                        d.extend(&data);
                        return d.next_frame()?.context("a whole frame per message");
                    }
                    Some(Ok(Message::Close(c))) => bail!("WebSocket closed: {c:?}"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("WebSocket: {e}"),
                    None => bail!("WebSocket ended"),
                }
            },
        }
    }
}

async fn ws_session(
    tls: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    openid: &str,
) -> Result<Carrier> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tls.connect(name, tcp).await?;
    let url = format!("wss://localhost:{}/gatesvr/v1", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    let mut c = Carrier::Ws(Box::new(ws));
    c.send(Body::Start(StartRequest {
        openid: openid.into(),
        auth_token: token(openid),
        client_version: "gate-bench".into(),
        ..Default::default()
    }))
    .await?;
    match c.next().await?.body {
        Some(Body::StartOk(_)) => Ok(c),
        other => bail!("expected StartResponse, got {other:?}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Quic,
    WebTransport,
    WebSocket,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Quic => "quic",
            Kind::WebTransport => "webtransport",
            Kind::WebSocket => "websocket",
        }
    }
}

struct Clients {
    net: Arc<Net>,
    tls: tokio_rustls::TlsConnector,
    h3: quinn::ClientConfig,
}

impl Clients {
    async fn open(&self, server: &ServerProc, kind: Kind, openid: &str) -> Result<Carrier> {
        match kind {
            Kind::Quic => Ok(Carrier::Quic(
                dp_session(&self.net, server.addr("quic")?, openid).await?.0,
            )),
            Kind::WebTransport => Ok(Carrier::Wt(Box::new(
                crate::wt::session(&self.net, &self.h3, server.addr("quic")?, openid).await?,
            ))),
            Kind::WebSocket => ws_session(&self.tls, server.addr("websocket")?, openid).await,
        }
    }
}

/// One request in flight for the window: round-trip latencies.
async fn rtt_loop(c: &mut Carrier, payload: &[u8], o: &Opts) -> Result<(Lat, u64)> {
    let start = Instant::now();
    let measure_from = start + o.warmup;
    let end = measure_from + o.window;
    let mut lat = Lat::default();
    let (mut n, mut seq) = (0u64, 0u64);
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        seq += 1;
        c.send(Body::Request(ClientRequest {
            msg_id: 1,
            seq_id: seq,
            payload: payload.to_vec(),
            ..Default::default()
        }))
        .await?;
        loop {
            if let Some(Body::Response(r)) = c.next().await?.body
                && r.seq_id == seq
            {
                break;
            }
        }
        let t1 = Instant::now();
        if t0 >= measure_from && t1 < end {
            lat.0.push((t1 - t0).as_nanos() as u64);
            n += 1;
        }
    }
    Ok((lat, n))
}

/// RSS growth per session with `n` idle sessions of `kind` held open.
async fn rss_per_session(
    clients: &Clients,
    server: &ServerProc,
    kind: Kind,
    n: usize,
) -> Result<f64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss()?;
    let results = crate::client::bounded((0..n).collect(), 64, |i| async move {
        clients
            .open(server, kind, &format!("idle-{}-{i}", kind.label()))
            .await
    })
    .await;
    let mut held = Vec::with_capacity(n);
    let mut failed = 0usize;
    for r in results {
        match r {
            Ok(c) => held.push(c),
            Err(_) => failed += 1,
        }
    }
    if failed > (n / 1000).max(1) {
        bail!("{failed} of {n} {} sessions failed to open", kind.label());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss()?;
    Ok(after.saturating_sub(before) as f64 / held.len().max(1) as f64)
}

pub async fn run(o: &Opts) -> Result<Report> {
    let mut rep = Report::new("web");
    let n = o.sessions;
    rep.param("idle_sessions", n);
    rep.param("rounds", o.rounds);
    rep.param("window_s", o.window.as_secs_f64());
    rep.param("payload_bytes", o.payload);
    let dir = o.rundir()?;
    let tls = gatesvr_common::tls::client_config(&dir.ca())?;
    let clients = Clients {
        net: Arc::new(Net::new(&dir.ca(), 16)?),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        h3: crate::wt::client_config(&dir.ca())?,
    };
    let payload = o.payload();

    // RSS per idle session: a fresh process per transport, and native QUIC on
    // a node without browser transports (their stream and datagram limits
    // apply to every QUIC connection).
    progress(format!(
        "web: {n} idle quic sessions, browser transports off"
    ));
    let (plain, _) = o.start_dataplane(&dir, false)?;
    let per = rss_per_session(&clients, &plain, Kind::Quic, n).await?;
    rep.field("quic_without_web_rss_bytes_per_session", per);
    drop(plain);
    for kind in [Kind::Quic, Kind::WebTransport, Kind::WebSocket] {
        progress(format!("web: {n} idle {} sessions", kind.label()));
        let server = o.start_web_dataplane(&dir)?;
        let per = rss_per_session(&clients, &server, kind, n).await?;
        rep.field(&format!("{}_rss_bytes_per_session", kind.label()), per);
    }

    // Round trips, interleaved per round on one node.
    let server = o.start_web_dataplane(&dir)?;
    let mut quic = clients.open(&server, Kind::Quic, "rtt-quic").await?;
    let mut wt = clients.open(&server, Kind::WebTransport, "rtt-wt").await?;
    let mut ws = clients.open(&server, Kind::WebSocket, "rtt-ws").await?;
    for r in 0..o.rounds {
        progress(format!("web rtt round {}/{}", r + 1, o.rounds));
        let mut round = Round::new();
        for (kind, c) in [
            (Kind::Quic, &mut quic),
            (Kind::WebTransport, &mut wt),
            (Kind::WebSocket, &mut ws),
        ] {
            let (mut lat, count) = rtt_loop(c, &payload, o).await?;
            round.insert(format!("{}_rtt_p50_us", kind.label()), lat.pct_us(50.0));
            round.insert(format!("{}_rtt_p99_us", kind.label()), lat.pct_us(99.0));
            round.insert(
                format!("{}_req_per_s", kind.label()),
                count as f64 / o.window.as_secs_f64(),
            );
        }
        rep.rounds.push(round);
    }
    rep.median_all();
    let f = rep.fields.clone();
    rep.checks.push(Check::ratio(
        "WebSocket RTT p50 vs native QUIC (report)",
        f["websocket_rtt_p50_us"],
        f["quic_rtt_p50_us"],
        Cmp::AtMost,
        f64::MAX,
    ));
    rep.checks.push(Check::ratio(
        "WebTransport RTT p50 vs native QUIC (report)",
        f["webtransport_rtt_p50_us"],
        f["quic_rtt_p50_us"],
        Cmp::AtMost,
        f64::MAX,
    ));
    rep.checks.push(Check::ratio(
        "WebTransport RSS/idle session vs native QUIC (report)",
        f["webtransport_rss_bytes_per_session"],
        f["quic_rss_bytes_per_session"],
        Cmp::AtMost,
        f64::MAX,
    ));
    rep.checks.push(Check::ratio(
        "WebSocket RSS/idle session vs native QUIC (report)",
        f["websocket_rss_bytes_per_session"],
        f["quic_rss_bytes_per_session"],
        Cmp::AtMost,
        f64::MAX,
    ));
    for c in &mut rep.checks {
        c.goal = "(report)".into();
    }
    rep.notes.push("all three transports on one data-plane process with transports.webtransport and a WebSocket listener on; echo routing; RSS per transport from a fresh process".into());
    Ok(rep)
}
