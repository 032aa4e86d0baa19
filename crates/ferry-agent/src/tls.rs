//! TLS for the gRPC API: the same mesh CA and host certificate as the QUIC data plane,
//! with client certificates required (agents and operators alike).

use crate::config::TlsConfig;
use anyhow::Context;
use ferry_transport::pki::Identity;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};

/// Loads the mesh identity named in the config.
pub fn load_identity(cfg: &TlsConfig) -> anyhow::Result<Identity> {
    Identity::load(&cfg.ca, &cfg.cert, &cfg.key).context("loading TLS identity")
}

/// Server-side TLS: our certificate, and only clients with a certificate from the mesh CA.
pub fn server_tls(id: &Identity) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&id.ca_pem))
}

/// A gRPC channel to `addr` ("host:port") authenticated with `id`. The host part must
/// appear in the server certificate's names.
pub async fn connect(addr: &str, id: &Identity) -> Result<Channel, ConnectError> {
    connect_with_deadline(addr, id, std::time::Duration::from_secs(60)).await
}

/// Why no channel to a peer was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// TCP connected (a frozen peer's kernel still accepts) but no TLS session followed.
    #[error("no TLS session with {addr} within {} s: the peer accepts connections and does not answer", .within.as_secs())]
    TimedOut {
        addr: String,
        within: std::time::Duration,
    },
}

/// How long making a channel may take, TCP, TLS and HTTP/2 handshakes together.
pub const CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// HTTP/2 pings while a call is out: a peer that powered off in the middle of a long call
/// (a cold Prepare hashing, a Finish verifying) fails it within about 30 s, not at the
/// end of the call's own deadline, which may be an hour away.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// [`connect`] with `deadline` on every call made over the channel: a peer that stops
/// answering gives `DEADLINE_EXCEEDED` instead of a hang. Connecting itself is bounded by
/// [`CONNECT_DEADLINE`].
pub async fn connect_with_deadline(
    addr: &str,
    id: &Identity,
    deadline: std::time::Duration,
) -> Result<Channel, ConnectError> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_matches(['[', ']']);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&id.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ))
        .domain_name(host.to_string());
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .timeout(deadline);
    // `connect_timeout` covers TCP only: the TLS handshake with a frozen peer never ends.
    match tokio::time::timeout(CONNECT_DEADLINE, endpoint.connect()).await {
        Ok(chan) => Ok(chan?),
        Err(_) => Err(ConnectError::TimedOut {
            addr: addr.to_string(),
            within: CONNECT_DEADLINE,
        }),
    }
}

/// How long a cached peer channel serves before a new connection (and TLS handshake)
/// replaces it: bounds how long one connection outlives a certificate change on either
/// side or a peer's deny list entry made after it was set up.
pub const PEER_CHANNEL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// gRPC channels to peer agents, one per address, reused across calls and migrations.
/// A new channel costs a TCP and a TLS handshake, two round trips before its first call:
/// on wan's 22 ms path 44 ms of every preflight and again of every Prepare
/// (benches/RESULTS.md, tenth session). A channel is one HTTP/2 connection carrying
/// concurrent calls, and it reconnects by itself when the peer restarts; every call still
/// runs under the caller's deadline.
#[derive(Default)]
pub struct PeerChannels {
    map: std::sync::Mutex<std::collections::HashMap<String, (Channel, std::time::Instant)>>,
    connects: std::sync::atomic::AtomicU64,
}

impl PeerChannels {
    /// The channel to `addr`, connected now when none is cached or the cached one is older
    /// than [`PEER_CHANNEL_MAX_AGE`].
    pub async fn get(&self, addr: &str, id: &Identity) -> Result<Channel, ConnectError> {
        let now = std::time::Instant::now();
        if let Ok(map) = self.map.lock() {
            if let Some((chan, made)) = map.get(addr) {
                if reusable(*made, now) {
                    return Ok(chan.clone());
                }
            }
        }
        let chan = connect(addr, id).await?;
        self.connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut map) = self.map.lock() {
            map.insert(addr.to_string(), (chan.clone(), now));
        }
        Ok(chan)
    }

    /// Drops the cached channel to `addr` (the next call connects afresh): after a call
    /// that timed out or found no peer, when the connection itself may be what failed.
    pub fn forget(&self, addr: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(addr);
        }
    }

    /// [`PeerChannels::forget`] when `status` says the peer was not reached or did not
    /// answer in time, rather than answering with an error of its own.
    pub fn forget_if_unreached(&self, addr: &str, status: &tonic::Status) {
        if unreached(status.code()) {
            self.forget(addr);
        }
    }

    /// Connections made so far (for the tests and the agent's log).
    pub fn connects(&self) -> u64 {
        self.connects.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether a channel made at `made` still serves at `now` ([`PEER_CHANNEL_MAX_AGE`]). Pure.
pub fn reusable(made: std::time::Instant, now: std::time::Instant) -> bool {
    now.saturating_duration_since(made) < PEER_CHANNEL_MAX_AGE
}

/// Whether a call's status code says the connection, not the peer, may have failed:
/// unreachable, timed out, or cut off mid-call. Pure.
pub fn unreached(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// Whether a call reached the peer: it answered, or refused with an error of its own
/// (not one of [`unreached`]'s). `None`: no answer in time. Pure.
pub fn reached<T>(answer: &Option<Result<T, tonic::Status>>) -> bool {
    match answer {
        Some(Ok(_)) => true,
        Some(Err(s)) => !unreached(s.code()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_channel_serves_until_its_max_age() {
        let made = Instant::now();
        assert!(reusable(made, made));
        assert!(reusable(
            made,
            made + PEER_CHANNEL_MAX_AGE - Duration::from_millis(1)
        ));
        assert!(!reusable(made, made + PEER_CHANNEL_MAX_AGE));
        // A clock read before `made` (another thread's `now`) is no age at all.
        assert!(reusable(made + Duration::from_secs(1), made));
    }

    #[test]
    fn only_transport_failures_drop_a_channel() {
        for c in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unknown,
        ] {
            assert!(unreached(c), "{c:?}");
        }
        for c in [
            tonic::Code::PermissionDenied,
            tonic::Code::NotFound,
            tonic::Code::AlreadyExists,
            tonic::Code::ResourceExhausted,
            tonic::Code::FailedPrecondition,
            tonic::Code::InvalidArgument,
        ] {
            assert!(!unreached(c), "{c:?}");
        }
        assert!(reached(&Some(Ok::<(), _>(()))));
        assert!(reached(&Some(Err::<(), _>(
            tonic::Status::permission_denied("no")
        ))));
        assert!(!reached(&Some(Err::<(), _>(tonic::Status::unavailable(
            "gone"
        )))));
        assert!(!reached::<()>(&None));
    }

    /// A peer that accepts the TCP connection and never speaks TLS (a frozen agent: its
    /// kernel completes the handshake from the listen backlog): no channel, within
    /// `CONNECT_DEADLINE`, saying why — before, the TLS handshake waited for ever.
    #[tokio::test]
    async fn a_peer_that_accepts_and_never_answers_gives_no_channel_in_bounded_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = ferry_testkit::TestPki::new(dir.path(), &["a"]).expect("pki");
        let a = pki.identity("a").expect("a");
        // Bound, listening, never accepting: the backlog holds the connection.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("localhost:{}", silent.local_addr().expect("addr").port());
        let t0 = Instant::now();
        let e = connect_with_deadline(&addr, &a, Duration::from_secs(3600))
            .await
            .expect_err("no channel to a silent peer");
        assert!(matches!(e, ConnectError::TimedOut { .. }), "{e:?}");
        assert!(e.to_string().contains("does not answer"), "{e}");
        let took = t0.elapsed();
        assert!(
            took >= CONNECT_DEADLINE && took < CONNECT_DEADLINE + Duration::from_secs(20),
            "{took:?}"
        );
        drop(silent);
    }

    /// A real TLS gRPC server (no services: the handshake is what the channel pays) behind
    /// a listener that counts the TCP connections it accepts.
    #[tokio::test]
    async fn one_connection_serves_many_gets_until_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = ferry_testkit::TestPki::new(dir.path(), &["a", "b"]).expect("pki");
        let (a, b) = (pki.identity("a").expect("a"), pki.identity("b").expect("b"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = accepted.clone();
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            move |s| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                s
            },
        );
        let server = tonic::transport::Server::builder()
            .tls_config(server_tls(&b))
            .expect("tls")
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming);
        let server = tokio::spawn(server);
        // The test certificates name the hosts and "localhost".
        let addr = format!("localhost:{port}");
        let peers = PeerChannels::default();
        for _ in 0..3 {
            peers.get(&addr, &a).await.expect("channel");
        }
        assert_eq!(peers.connects(), 1);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        peers.forget_if_unreached(&addr, &tonic::Status::permission_denied("no"));
        peers.get(&addr, &a).await.expect("channel");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        peers.forget_if_unreached(&addr, &tonic::Status::unavailable("gone"));
        peers.get(&addr, &a).await.expect("channel");
        assert_eq!(peers.connects(), 2);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        server.abort();
    }
}
