//! The client edge's transport: the send window (`edge::quic::SEND_WINDOW`),
//! which keeps a connection at most that many bytes ahead of the client's
//! acks however much flow-control credit the client grants, and the ACK
//! frequency the node asks of its clients.

use std::sync::Arc;

use gatesvr_dataplane::config::ServerConfig;
use gatesvr_dataplane::edge::quic;

#[tokio::test]
async fn a_connection_buffers_at_most_the_send_window_unacked() {
    // A client granting far more credit than the window, and never reading.
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(16 << 20));
    let (_dir, server, client) = node_and_client(transport);
    let addr = server.local_addr().unwrap();

    let accepted = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut first = [0u8; 1];
        recv.read_exact(&mut first).await.unwrap();
        // One write of 1 MiB: quinn takes what the window allows and returns.
        let taken = send.write(&vec![7u8; 1 << 20]).await.unwrap();
        (taken, conn)
    });
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1]).await.unwrap();
    let (taken, _server_conn) = accepted.await.unwrap();
    assert!(taken > 0, "the server could not write at all");
    assert!(
        taken as u64 <= quic::SEND_WINDOW,
        "one write took {taken} bytes ahead of any ack, over the send window of {}",
        quic::SEND_WINDOW
    );
}

/// The node asks its clients to ACK every `ACK_ELICITING_THRESHOLD + 1`
/// packets (the QUIC ACK frequency extension, which quinn clients support),
/// not every second one, so that their ACKs ride on their own acks of the
/// pushes. The request is checked as the client received it; how many ACKs
/// the client then sends depends on how its packets arrive (a loaded
/// machine spaces them past the max ACK delay), so that is bounded only
/// by the default's one per two packets.
#[tokio::test]
async fn clients_are_asked_to_ack_every_tenth_packet() {
    // quinn's client defaults: it supports the ACK frequency extension.
    let (_dir, server, client) = node_and_client(quinn::TransportConfig::default());
    let addr = server.local_addr().unwrap();

    const BYTES: usize = 200 * 1000;
    let accepted = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut first = [0u8; 1];
        recv.read_exact(&mut first).await.unwrap();
        for piece in vec![7u8; BYTES].chunks(1000) {
            send.write_all(piece).await.unwrap();
        }
        send.finish().unwrap();
        conn
    });
    let conn = client.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1]).await.unwrap();
    let got = recv.read_to_end(BYTES + 1).await.unwrap();
    assert_eq!(got.len(), BYTES);
    let server_conn = accepted.await.unwrap();
    let stats = conn.stats();
    assert!(
        stats.frame_rx.ack_frequency >= 1,
        "the node sent no ACK_FREQUENCY frame"
    );
    let (received, acks) = (stats.udp_rx.datagrams, stats.frame_tx.acks);
    assert!(
        received >= 150,
        "{received} datagrams carried {BYTES} bytes"
    );
    assert!(
        acks * 2 <= received,
        "the client sent {acks} ACK frames for {received} datagrams"
    );
    drop(server_conn);
}

/// A node's client endpoint (the data plane's own transport settings) and a
/// quinn client with `transport`; the directory holds their certificates.
fn node_and_client(
    transport: quinn::TransportConfig,
) -> (tempfile::TempDir, quinn::Endpoint, quinn::Endpoint) {
    gatesvr_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = gatesvr_common::certs::generate(&dir.path().join("certs"), &[]).unwrap();
    let files = certs.server();
    let server = quic::bind(&ServerConfig {
        quic_addr: "127.0.0.1:0".into(),
        cert_file: files.cert_file,
        key_file: files.key_file,
        ..ServerConfig::default()
    })
    .unwrap();
    let mut tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    config.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(config);
    (dir, server, client)
}
