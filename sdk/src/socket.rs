//! The client's UDP socket, which hears when a gateway address has no process behind it.
//!
//! A TCP client learns of a crashed server at once: the server's kernel answers with a RST. A
//! QUIC client on a plain socket never hears the QUIC counterpart, the ICMP "port unreachable"
//! the gateway's host sends for every datagram after the process died, and waits out its idle
//! timeout (`liveness_timeout`, 15 s by default). Two sockets here hear it:
//!
//! - [`connected_endpoint`] (the SDK's, one per connection): a socket `connect()`ed to the
//!   gateway, on which Linux (and the BSDs) report the ICMP message as `ECONNREFUSED`;
//! - [`shared_endpoint`] (many connections on one socket, as a load generator has; Linux and
//!   Android only): an unconnected socket with `IP_RECVERR`, whose error queue names the
//!   address that refused.
//!
//! On Windows, which reports the ICMP message as `WSAECONNRESET` instead, nothing is counted:
//! the idle timeout notices a crash there, as before.
//!
//! Both read the error as soon as the ICMP message arrives (a task waits for the socket's
//! error event), and quinn gets them through an [`AsyncUdpSocket`](quinn::AsyncUdpSocket) that
//! counts the refusals instead of dropping them silently (quinn's own socket drops send errors
//! and retries receive errors). [`Refusals`] tells the connection driver.
//!
//! One refusal proves little: an ICMP message can be spoofed by anyone on the path.
//! [`Refusals::gone`] is true only after **two** refusals with no datagram received from the
//! address since the first; the driver sends an ack-eliciting probe after the first
//! ([`Refusals::changed`]), which a live gateway answers within a round trip. A gateway whose
//! whole host or network is gone sends no ICMP at all: the idle timeout still covers it. The
//! kernel rate-limits ICMP per destination host (`net.ipv4.icmp_ratelimit`, 1 s, burst 6;
//! loopback is exempt) and in total (`icmp_msgs_per_sec`, 1000/s), so when thousands of clients
//! of one node lose it at once, the ones whose refusals were rate-limited fall back to the idle
//! timeout.

#[cfg(any(target_os = "linux", target_os = "android"))]
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
#[cfg(any(target_os = "linux", target_os = "android"))]
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::sync::Notify;

/// What the kernel reported of one gateway address.
#[derive(Debug, Default)]
pub struct Refusals {
    /// `ECONNREFUSED` reports since the last datagram was received.
    refused: AtomicU64,
    /// Every `ECONNREFUSED` report (for tests and metrics).
    total: AtomicU64,
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
    let refusals = Arc::new(Refusals::default());
    let endpoint = endpoint_on(socket, Heard::One(refusals.clone()))?;
    Ok((endpoint, refusals))
}

/// Refusals by gateway address, for the connections of one [`shared_endpoint`] (Linux).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[derive(Debug, Default)]
pub struct PeerRefusals {
    peers: parking_lot::Mutex<HashMap<SocketAddr, Arc<Refusals>>>,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl PeerRefusals {
    /// What the kernel reports of `peer` (shared by every connection to it on this socket).
    pub fn of(&self, peer: SocketAddr) -> Arc<Refusals> {
        self.peers.lock().entry(peer).or_default().clone()
    }

    fn get(&self, peer: &SocketAddr) -> Option<Arc<Refusals>> {
        self.peers.lock().get(peer).cloned()
    }
}

/// A client endpoint on `socket` (bound, not connected), for many connections to any
/// addresses, with what the kernel reports of each address (`IP_RECVERR`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn shared_endpoint(
    socket: std::net::UdpSocket,
) -> io::Result<(quinn::Endpoint, Arc<PeerRefusals>)> {
    if socket.local_addr()?.is_ipv4() {
        nix::sys::socket::setsockopt(
            socket.as_raw_fd(),
            nix::sys::socket::sockopt::Ipv4RecvErr,
            &true,
        )?;
    } else {
        nix::sys::socket::setsockopt(
            socket.as_raw_fd(),
            nix::sys::socket::sockopt::Ipv6RecvErr,
            &true,
        )?;
    }
    let peers = Arc::new(PeerRefusals::default());
    let endpoint = endpoint_on(socket, Heard::ByPeer(peers.clone()))?;
    Ok((endpoint, peers))
}

/// Where a socket's refusals go.
#[derive(Debug, Clone)]
enum Heard {
    /// A connected socket: every refusal is its peer's.
    One(Arc<Refusals>),
    /// An unconnected socket: the error queue names the peer.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    ByPeer(Arc<PeerRefusals>),
}

fn endpoint_on(socket: std::net::UdpSocket, heard: Heard) -> io::Result<quinn::Endpoint> {
    socket.set_nonblocking(true)?;
    let state = UdpSocketState::new((&socket).into())?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(watch_errors(
        tokio::net::UdpSocket::from_std(socket.try_clone()?)?,
        heard.clone(),
        stopped,
    ));
    let socket = RefusingSocket {
        io: tokio::net::UdpSocket::from_std(socket)?,
        state,
        heard,
        _stop_watching: stop,
    };
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )
}

/// Counts a refusal as soon as its ICMP message arrives. The kernel flags the socket (EPOLLERR)
/// but reports the error only to the next send or receive, and the next send is a
/// retransmission a probe timeout later, which the report then drops: reading the error here
/// hears it a timeout sooner and spares that datagram. `socket` is a second descriptor of the
/// endpoint's socket; the task ends when the endpoint's socket is dropped (`stopped`).
async fn watch_errors(
    socket: tokio::net::UdpSocket,
    heard: Heard,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            ready = socket.ready(Interest::ERROR) => {
                if ready.is_err() {
                    return;
                }
                match &heard {
                    Heard::One(refusals) => match socket.take_error() {
                        Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            refusals.refused();
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    Heard::ByPeer(peers) => {
                        while let Some(peer) = next_refusal(&socket) {
                            if let Some(refusals) = peer.and_then(|p| peers.get(&p)) {
                                refusals.refused();
                            }
                        }
                        // The queue is read: the pending error it set is stale.
                        let _ = socket.take_error();
                    }
                }
                // Wait for the next error event.
                let _ = socket.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
            }
            _ = &mut stopped => return,
        }
    }
}

/// The next entry of an `IP_RECVERR` socket's error queue: `Some(Some(peer))` for a port
/// unreachable from `peer`, `Some(None)` for any other error, `None` once the queue is empty.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn next_refusal(socket: &tokio::net::UdpSocket) -> Option<Option<SocketAddr>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut data = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut control = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let refused = msg.cmsgs().any(|c| match c {
        ControlMessageOwned::Ipv4RecvErr(e, _) | ControlMessageOwned::Ipv6RecvErr(e, _) => {
            e.ee_errno == nix::libc::ECONNREFUSED as u32
        }
        _ => false,
    });
    let peer = msg.address.and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::V4((*v4).into()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
    });
    Some(peer.filter(|_| refused))
}

/// quinn's tokio socket, with refusals counted instead of dropped.
struct RefusingSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    heard: Heard,
    /// Dropped with the socket: ends [`watch_errors`].
    _stop_watching: tokio::sync::oneshot::Sender<()>,
}

impl fmt::Debug for RefusingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusingSocket")
            .field("io", &self.io)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for RefusingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            ready: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let send = || {
            self.io.try_io(Interest::WRITABLE, || {
                self.state.try_send((&self.io).into(), transmit)
            })
        };
        let sent = match send() {
            // The report of an earlier datagram's ICMP (unless the watcher read it first),
            // which the kernel gave this send instead of sending it: send it again (the report
            // is consumed). On a shared socket the datagram is often another peer's, and the
            // error queue says whose the refusal was.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                if let Heard::One(refusals) = &self.heard {
                    refusals.refused();
                }
                send()
            }
            sent => sent,
        };
        match sent {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            // Another refusal arrived meanwhile: QUIC's loss recovery sends these frames
            // again, as after any lost datagram.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                if let Heard::One(refusals) = &self.heard {
                    refusals.refused();
                }
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
                    match &self.heard {
                        Heard::One(refusals) => refusals.received(n),
                        #[cfg(any(target_os = "linux", target_os = "android"))]
                        Heard::ByPeer(peers) => {
                            for m in &meta[..n] {
                                if let Some(refusals) = peers.get(&m.addr) {
                                    refusals.received(1);
                                }
                            }
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    if let Heard::One(refusals) = &self.heard {
                        refusals.refused();
                    }
                }
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
    socket: Arc<RefusingSocket>,
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

    /// A QUIC server on loopback and a client endpoint. After the server's socket is closed
    /// (its endpoint moved to another port, as when its process dies), the client's packets to
    /// the old port are refused and it says the gateway is gone; while the server was up,
    /// nothing was refused. The idle timeout (60 s) is beyond the test's patience.
    async fn a_closed_port_is_reported_and_a_live_one_is_not(shared: bool) {
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

        let (mut client, refusals, _other) = if shared {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                let (client, peers) =
                    shared_endpoint(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
                // Another address's refusals stay its own.
                let other = peers.of("127.0.0.1:9".parse().unwrap());
                (client, peers.of(addr), Some(other))
            }
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            unreachable!("shared sockets hear refusals on Linux only")
        } else {
            let (client, refusals) = connected_endpoint(addr).unwrap();
            (client, refusals, None)
        };
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
            loop {
                let changed = refusals.changed();
                if refusals.gone() {
                    break;
                }
                changed.await;
            }
        })
        .await
        .expect("the closed port's refusals reached the client");
        assert!(refusals.total() >= 2);
        if let Some(other) = _other {
            assert_eq!(other.total(), 0, "refusals are told apart by address");
        }
    }

    #[tokio::test]
    async fn a_connected_socket_hears_a_closed_port() {
        a_closed_port_is_reported_and_a_live_one_is_not(false).await;
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn a_shared_socket_hears_a_closed_port_by_its_address() {
        a_closed_port_is_reported_and_a_live_one_is_not(true).await;
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
