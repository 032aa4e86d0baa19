//! Real QUIC connections over loopback with mutual TLS.

use ferry_transport::pki::{generate_ca, issue_host_cert, Identity, PemPair};
use ferry_transport::{
    read_stream_header, write_stream_header, ControlChannel, QuicEndpoint, TransportTuning,
};
use ferry_wire::{ControlMessage, StreamHeader, StreamKind};
use std::time::Duration;

fn identity(ca: &PemPair, host: &str) -> Identity {
    let pair = issue_host_cert(ca, host, &[]).unwrap();
    Identity {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: pair.cert_pem,
        key_pem: pair.key_pem,
    }
}

fn tuning() -> TransportTuning {
    TransportTuning {
        idle_timeout: Duration::from_secs(3),
        ..TransportTuning::default()
    }
}

/// A server endpoint on a free loopback port, and its address.
fn bind_server(id: &Identity, t: &TransportTuning) -> (QuicEndpoint, std::net::SocketAddr) {
    let server = QuicEndpoint::bind("127.0.0.1:0".parse().unwrap(), id, t).unwrap();
    let addr = server.local_addr().unwrap();
    (server, addr)
}

#[tokio::test]
async fn same_ca_peers_exchange_control_messages() {
    let ca = generate_ca("test mesh").unwrap();
    let (server, addr) = bind_server(&identity(&ca, "b"), &tuning());
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().unwrap();
        let (send, mut recv) = conn.accept_bi().await.unwrap();
        let h = read_stream_header(&mut recv).await.unwrap();
        assert_eq!(h.kind, StreamKind::Control);
        let mut ch = ControlChannel::new(send, recv);
        let msg = ch.recv().await.unwrap();
        assert_eq!(msg, ControlMessage::DigestRequest);
        ch.send(&ControlMessage::Digest { xxh3_128: [7; 16] })
            .await
            .unwrap();
        // Keep the connection open until the client has read the reply.
        conn.closed().await;
    });
    let client = QuicEndpoint::client(addr, &identity(&ca, "a"), &tuning()).unwrap();
    let conn = client.connect(addr, "127.0.0.1").await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    write_stream_header(&mut send, StreamHeader::new(StreamKind::Control, 0))
        .await
        .unwrap();
    let mut ch = ControlChannel::new(send, recv);
    ch.send(&ControlMessage::DigestRequest).await.unwrap();
    assert_eq!(
        ch.recv().await.unwrap(),
        ControlMessage::Digest { xxh3_128: [7; 16] }
    );
    conn.close(0u32.into(), b"done");
    srv.await.unwrap();
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let mesh = generate_ca("mesh").unwrap();
    let rogue = generate_ca("rogue").unwrap();
    let (server, addr) = bind_server(&identity(&mesh, "b"), &tuning());
    let srv = tokio::spawn(async move { server.accept().await.unwrap() });
    // The rogue client trusts the mesh CA (so it accepts the server) but its own
    // certificate comes from another CA: the server must refuse the handshake.
    let mut rogue_id = identity(&rogue, "a");
    rogue_id.ca_pem = mesh.cert_pem.clone();
    let client = QuicEndpoint::client(addr, &rogue_id, &tuning()).unwrap();
    let client_side = async {
        let conn = client.connect(addr, "127.0.0.1").await?;
        // With TLS 1.3 the client may finish first; the refusal then shows on first use.
        let (mut send, _recv) = conn
            .open_bi()
            .await
            .map_err(|e| ferry_transport::TransportError::Stream(e.to_string()))?;
        send.write_all(b"x")
            .await
            .map_err(|e| ferry_transport::TransportError::Stream(e.to_string()))?;
        conn.closed().await;
        Err::<(), _>(ferry_transport::TransportError::Closed)
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .unwrap();
    assert!(client_result.is_err());
    let server_result = srv.await.unwrap();
    let err = server_result.expect_err("server must refuse a certificate from another CA");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "error names the certificate: {err}"
    );
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_client() {
    let mesh = generate_ca("mesh").unwrap();
    let rogue = generate_ca("rogue").unwrap();
    let (server, addr) = bind_server(&identity(&rogue, "b"), &tuning());
    tokio::spawn(async move { server.accept().await });
    let client = QuicEndpoint::client(addr, &identity(&mesh, "a"), &tuning()).unwrap();
    let err = client
        .connect(addr, "127.0.0.1")
        .await
        .expect_err("untrusted server");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn dev_pki_files_load() {
    let dir = tempfile::tempdir().unwrap();
    ferry_transport::pki::write_dev_pki(
        dir.path(),
        &[("a".into(), vec!["10.0.0.1".into()]), ("b".into(), vec![])],
    )
    .unwrap();
    let f = ferry_transport::pki::host_files(dir.path(), "a");
    Identity::load(&f.ca, &f.cert, &f.key).unwrap();
    // A missing file is an error naming the file.
    let err = Identity::load(&f.ca, &dir.path().join("nope.pem"), &f.key).unwrap_err();
    assert!(err.to_string().contains("nope.pem"));
}

/// Sends `bursts` writes of two packets' worth, 1 ms apart (so datagrams reach the
/// receiver a few at a time, as on a paced link, not in the large batches of a loopback
/// burst, which quinn acknowledges once per batch anyway), from a client to a server both
/// tuned with `ack_every`; returns (datagrams the server received, ACK frames it sent),
/// read from the server's own connection statistics.
async fn acks_for_paced_transfer(ack_every: u32, bursts: usize) -> (u64, u64) {
    const BURST: usize = 2400;
    let ca = generate_ca("test mesh").unwrap();
    let t = TransportTuning {
        ack_every,
        ..tuning()
    };
    let (server, addr) = bind_server(&identity(&ca, "b"), &t);
    let srv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().unwrap();
        let mut recv = conn.accept_uni().await.unwrap();
        let got = recv.read_to_end(usize::MAX).await.unwrap();
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        (got.len(), stats.udp_rx.datagrams, stats.frame_tx.acks)
    });
    let client = QuicEndpoint::client(addr, &identity(&ca, "a"), &t).unwrap();
    let conn = client.connect(addr, "127.0.0.1").await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    // A late tick must not make up for lost ones in a burst: bunched writes arrive together
    // and are acknowledged together, whatever the setting.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..bursts {
        tick.tick().await;
        send.write_all(&[0x5a; BURST]).await.unwrap();
    }
    send.finish().unwrap();
    let (len, datagrams, acks) = srv.await.unwrap();
    assert_eq!(len, bursts * BURST, "the whole stream arrived");
    (datagrams, acks)
}

#[tokio::test]
async fn thinned_acks_are_requested_of_the_receiver() {
    let (rx_default, acks_default) = acks_for_paced_transfer(2, 300).await;
    let (rx_thin, acks_thin) = acks_for_paced_transfer(10, 300).await;
    // RFC 9000's rule: an ACK for every second packet (one per 2.3 datagrams here, one
    // per 3.1 seen on a loaded host, which reads more packets per wake-up); asked for one
    // per ten (or 5 ms), the receiver sends a fraction of that.
    assert!(
        acks_default * 4 >= rx_default,
        "default: {acks_default} ACKs for {rx_default} datagrams"
    );
    assert!(
        acks_thin * 4 <= rx_thin,
        "ack_every 10: {acks_thin} ACKs for {rx_thin} datagrams"
    );
    assert!(
        acks_thin * 2 < acks_default,
        "ack_every 10 sent {acks_thin} ACKs, the default {acks_default}"
    );
    eprintln!("ACKs: default {acks_default}/{rx_default}, every 10: {acks_thin}/{rx_thin}");
}

/// Careful resume: a connection opened with a window starts with it (the controller quinn
/// runs for this connection reports it), one opened without starts with slow start's.
#[tokio::test]
async fn resumed_connection_starts_with_the_given_window() {
    let ca = generate_ca("test mesh").unwrap();
    let (server, addr) = bind_server(&identity(&ca, "b"), &tuning());
    let srv = tokio::spawn(async move {
        for _ in 0..2 {
            let conn = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { conn.closed().await });
        }
    });
    let client = QuicEndpoint::client(addr, &identity(&ca, "a"), &tuning()).unwrap();
    const JUMP: u64 = 1_000_000;
    let resumed = client
        .connect_ip_with_window(addr, Some(JUMP))
        .await
        .unwrap();
    let fresh = client.connect_ip_with_window(addr, None).await.unwrap();
    let (w_resumed, w_fresh) = (resumed.stats().path.cwnd, fresh.stats().path.cwnd);
    // The handshake's own acknowledgements may add a few KB in slow start.
    assert!(
        (JUMP..JUMP + 64_000).contains(&w_resumed),
        "resumed window {w_resumed}"
    );
    assert!(
        w_fresh < 100_000 && w_fresh >= ferry_transport::default_initial_window(),
        "fresh window {w_fresh}"
    );
    resumed.close(0u32.into(), b"done");
    fresh.close(0u32.into(), b"done");
    srv.await.unwrap();
}

/// QUIC runs on the data plane's own thread: a stream of 4 MiB crosses a connection set up
/// from this test's single-threaded runtime while that runtime's only thread is blocked
/// (were the endpoint's or the connection's drivers on it, nothing would move).
#[tokio::test(flavor = "current_thread")]
async fn quic_moves_while_the_callers_runtime_is_blocked() {
    let ca = generate_ca("test mesh").unwrap();
    let (server, addr) = bind_server(&identity(&ca, "b"), &tuning());
    let client = QuicEndpoint::client(addr, &identity(&ca, "a"), &tuning()).unwrap();
    let (accepted, connected) = tokio::join!(server.accept(), client.connect(addr, "127.0.0.1"));
    let (conn_t, conn_s) = (accepted.unwrap().unwrap(), connected.unwrap());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    ferry_transport::data_plane::spawn(async move {
        let mut recv = conn_t.accept_uni().await.unwrap();
        let got = recv.read_to_end(8 << 20).await.unwrap();
        done_tx.send(got.len()).unwrap();
        conn_t.closed().await;
    });
    ferry_transport::data_plane::spawn(async move {
        let mut send = conn_s.open_uni().await.unwrap();
        send.write_all(&vec![7u8; 4 << 20]).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        conn_s.close(0u32.into(), b"done");
    });
    // Blocks this runtime's one thread until the bytes are across.
    let got = done_rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(got, Ok(4 << 20));
    drop((server, client));
}
