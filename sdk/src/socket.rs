//! The client's UDP socket: connected to the one gateway address it talks to, so the kernel
//! tells it when that address has no process behind it.
//!
//! A TCP client learns of a crashed server at once: the server's kernel answers with a RST. A
//! QUIC client on an unconnected socket never hears the QUIC counterpart, the ICMP "port
//! unreachable" the gateway's host sends for every datagram after the process died, and waits
//! out its idle timeout (`liveness_timeout`, 15 s by default). On a socket `connect()`ed to the
//! gateway, Linux (and the BSDs) report that ICMP as `ECONNREFUSED` on the socket's next send
//! or receive. [`connected_endpoint`] gives quinn such a socket, through an
//! [`AsyncUdpSocket`](quinn::AsyncUdpSocket) that counts those refusals instead of dropping
//! them silently (quinn's own socket drops send errors and retries receive errors), and
//! [`Refusals`] tells the connection driver.
//!
//! One refusal proves little: an ICMP message can be spoofed by anyone on the path, and a send
//! that reports one drops its datagram. [`Refusals::gone`] is true only after **two** refusals
//! with no datagram received since the first; the driver sends an ack-eliciting probe after the
//! first ([`Refusals::changed`]), which a live gateway answers within a round trip. A gateway
//! whose whole host or network is gone sends no ICMP at all: the idle timeout still covers it.
//! The kernel rate-limits ICMP per destination host (`net.ipv4.icmp_ratelimit`, 1 s, burst 6;
//! loopback is exempt) and in total (`icmp_msgs_per_sec`, 1000/s), so when thousands of clients
//! of one node lose it at once, the ones whose refusals were rate-limited fall back to the idle
//! timeout.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::Notify;

/// What the kernel reported on one connected socket.
#[derive(Debug, Default)]
pub struct Refusals {
    /// `ECONNREFUSED` reports since the last datagram was received.
    refused: AtomicU64,
    /// Every `ECONNREFUSED` report (for tests and metrics).
    total: AtomicU64,
    /// Datagrams received.
    received: AtomicU64,
    changed: Notify,
}

impl Refusals {
    /// The gateway's port refused two datagrams and nothing came back since the first: its
    /// process is gone.
    pub fn gone(&self) -> bool {
        self.refused.load(Ordering::Acquire) >= 2
    }

    /// The gateway's port refused at least one datagram since the last one received.
    pub fn suspected(&self) -> bool {
        self.refused.load(Ordering::Acquire) >= 1
    }

    /// Every refusal this socket saw.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Resolves after the next refusal. Take it before checking [`Refusals::gone`]: a refusal
    /// between the check and the wait still wakes it.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn refused(&self) {
        self.total.fetch_add(1, Ordering::AcqRel);
        self.refused.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn received(&self, datagrams: usize) {
        if datagrams > 0 {
            self.received.fetch_add(datagrams as u64, Ordering::AcqRel);
            self.refused.store(0, Ordering::Release);
        }
    }
}

/// A client endpoint on a new UDP socket connected to `peer`, with the socket's [`Refusals`].
/// The endpoint can only talk to `peer` (no connection migration to another server address,
/// which GateSvr does not use).
pub fn connected_endpoint(peer: SocketAddr) -> io::Result<(quinn::Endpoint, Arc<Refusals>)> {
    let bind: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(peer)?;
    socket.set_nonblocking(true)?;
    let state = UdpSocketState::new((&socket).into())?;
    let refusals = Arc::new(Refusals::default());
    let socket = ConnectedSocket {
        io: tokio::net::UdpSocket::from_std(socket)?,
        state,
        refusals: refusals.clone(),
    };
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, refusals))
}

/// quinn's tokio socket, with refusals counted instead of dropped.
struct ConnectedSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    refusals: Arc<Refusals>,
}

impl fmt::Debug for ConnectedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectedSocket")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ConnectedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            ready: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.io.try_io(Interest::WRITABLE, || {
            self.state.try_send((&self.io).into(), transmit)
        });
        match sent {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            // The report of an earlier datagram's ICMP; this one was not sent. QUIC's loss
            // recovery sends its frames again, as after any lost datagram.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                self.refusals.refused();
                Ok(())
            }
            // Like quinn's own socket: any other error loses this datagram only.
            Err(e) => {
                tracing::debug!(error = %e, "UDP send failed; the datagram is lost");
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            match self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                Ok(n) => {
                    self.refusals.received(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.refusals.refused(),
                // WouldBlock cleared the readiness; the next poll registers the waker. Other
                // errors are retried, as quinn's own socket does.
                Err(_) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type Ready = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits for the socket to be writable; one per task that sends (quinn's contract).
struct Writable {
    socket: Arc<ConnectedSocket>,
    ready: Option<Ready>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let socket = self.socket.clone();
        let ready = self
            .ready
            .get_or_insert_with(|| Box::pin(async move { socket.io.writable().await }));
        let result = ready.as_mut().poll(cx);
        if result.is_ready() {
            self.ready = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A QUIC server on loopback, the client on a connected endpoint. After the server's
    /// socket is closed (its endpoint moved to another port, as when its process dies), the
    /// client's packets to the old port are refused and it says the gateway is gone; while
    /// the server was up, nothing was refused.
    #[tokio::test]
    async fn a_closed_port_is_reported_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let certs = gatesvr_common::certs::generate(dir.path(), &[]).unwrap();
        gatesvr_common::tls::install_crypto_provider();
        let tls = gatesvr_common::tls::server_config(&certs.server()).unwrap();
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        let server =
            quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_millis(100)))
            .max_idle_timeout(Some(Duration::from_secs(60).try_into().unwrap()));
        client_config.transport_config(Arc::new(transport));

        let (mut client, refusals) = connected_endpoint(addr).unwrap();
        client.set_default_client_config(client_config);
        let accept = tokio::spawn({
            let server = server.clone();
            async move { server.accept().await.unwrap().await.unwrap() }
        });
        let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
        let _server_side = accept.await.unwrap();
        // Keep-alives go back and forth for a while: none is refused.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(refusals.total(), 0, "a live gateway's port refuses nothing");
        assert!(conn.close_reason().is_none());

        // The server's socket closes: its port has no process behind it any more. (quinn
        // keeps the socket it rebinds from until traffic arrives on the new one, which the
        // client never sends: a second rebind drops the first socket.)
        for _ in 0..2 {
            server
                .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            while !refusals.gone() {
                let changed = refusals.changed();
                if refusals.gone() {
                    break;
                }
                changed.await;
            }
        })
        .await
        .expect("the closed port's refusals reached the client (idle timeout is 60 s)");
        assert!(refusals.total() >= 2);
    }

    #[test]
    fn a_received_datagram_clears_a_suspicion() {
        let r = Refusals::default();
        r.refused();
        assert!(r.suspected() && !r.gone());
        r.received(1);
        assert!(!r.suspected());
        r.refused();
        assert!(!r.gone(), "one refusal since the last datagram");
        r.refused();
        assert!(r.gone());
        r.received(0);
        assert!(r.gone(), "an empty receive is no answer");
        assert_eq!(r.total(), 3);
    }
}
