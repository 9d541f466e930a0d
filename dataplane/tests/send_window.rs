//! The client edge's transport: the send window (`edge::quic::SEND_WINDOW`),
//! which keeps a connection at most that many bytes ahead of the client's
//! acks however much flow-control credit the client grants, and the ACK
//! frequency the node asks of its clients.

use std::sync::Arc;

use gatesvr_dataplane::config::ServerConfig;
use gatesvr_dataplane::edge::quic;

#[tokio::test]
async fn a_connection_buffers_at_most_the_send_window_unacked() {
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
    let addr = server.local_addr().unwrap();

    // A client granting far more credit than the window, and never reading.
    let mut tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(16 << 20))
        .receive_window(quinn::VarInt::from_u32(16 << 20));
    config.transport_config(Arc::new(transport));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(config);

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
/// packets (QUIC ACK frequency), not every second one: a client reading a
/// burst of pushes sends a fraction of the ACK-only datagrams, and the ones
/// it does send ride on its own acks of the pushes.
#[tokio::test]
async fn clients_are_asked_to_ack_every_tenth_packet() {
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
    let addr = server.local_addr().unwrap();
    let mut tls = gatesvr_common::tls::client_config(&certs.ca_cert()).unwrap();
    tls.alpn_protocols = vec![gatesvr_proto::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(config);

    const PIECES: usize = 200;
    const BYTES: usize = PIECES * 1000;
    let accepted = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut first = [0u8; 1];
        recv.read_exact(&mut first).await.unwrap();
        // One packet at a time, as pushes to a quiet session go: without
        // the request the client ACKs every second one.
        for piece in vec![7u8; BYTES].chunks(BYTES / PIECES) {
            send.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
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
    let (received, acks) = (stats.udp_rx.datagrams, stats.frame_tx.acks);
    assert!(
        received >= PIECES as u64,
        "{received} datagrams carried {PIECES} writes"
    );
    // Every second packet would be ~received / 2; every tenth, ~received / 10.
    assert!(
        acks * 5 <= received,
        "the client sent {acks} ACK frames for {received} datagrams"
    );
    drop(server_conn);
}
