//! QUIC endpoints with mutual TLS, following quinn's own examples.

use crate::pki::Identity;
use crate::TransportError;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol id of ferry's data plane.
pub const ALPN: &[u8] = b"ferry/1";

/// Congestion controller of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// Model-based (quinn's BBR): keeps the pipe full on long, lossy links, but overfills
    /// shallow bottleneck queues (~40% of what it sent lost on the testbed's wan).
    Bbr,
    /// Loss-based (quinn's default): collapses at 0.1% loss and 50 ms RTT.
    Cubic,
    /// Cubic that ignores losses no queue explains ([`crate::congestion`]): the default.
    DelayFilteredCubic,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "cubic-filtered" => Ok(Congestion::DelayFilteredCubic),
            other => Err(format!(
                "congestion controller must be \"bbr\", \"cubic\" or \"cubic-filtered\", not {other:?}"
            )),
        }
    }
}

/// Flow-control and liveness settings.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// A peer silent for this long is declared gone (keep-alives run at a third of it).
    pub idle_timeout: Duration,
    /// Receive window per stream.
    pub stream_window: u32,
    /// Receive and send window per connection.
    pub connection_window: u32,
    pub congestion: Congestion,
    /// UDP socket send and receive buffers (bytes). The kernel default (~200 KiB) drops
    /// datagrams at 1 Gbit/s, which QUIC takes as congestion.
    pub socket_buffer: usize,
    /// The peer acknowledges every this many ack-eliciting packets (QUIC's ACK frequency
    /// extension, which quinn speaks on both ends); 2 is RFC 9000's rule. Each ACK is a
    /// datagram the receiver sends and the sender processes: at 1 Gbit/s every second
    /// packet means ~40,000 of them a second.
    pub ack_every: u32,
}

impl Default for TransportTuning {
    fn default() -> Self {
        // Windows for a 1 Gbit/s, 50 ms link (BDP ~6 MiB) with room to spare, and no more:
        // the connection's receive window is also how far the sender may run ahead of a
        // receiver that applies pages slower than the link carries them. On lan (2.7 Gbit/s,
        // a CPU-starved target applying ~265 MB/s) 64 MiB let rounds queue ~240 ms deep;
        // switchovers waited for that queue to drain and paused 37-170 ms, against 14-34 ms
        // with 16 MiB (benches/RESULTS.md, eighth session).
        TransportTuning {
            idle_timeout: Duration::from_secs(10),
            stream_window: 16 << 20,
            connection_window: 16 << 20,
            congestion: Congestion::DelayFilteredCubic,
            socket_buffer: 8 << 20,
            ack_every: 2,
        }
    }
}

/// Longest the peer may hold an ACK back when it acknowledges less often than every second
/// packet: the last packets of a burst are not left waiting for the 25 ms default.
const ACK_DELAY_WHEN_THINNED: Duration = Duration::from_millis(5);

/// The ACK frequency to request of the peer for acknowledging every `ack_every`
/// ack-eliciting packets (0 and 1: every packet); `None` leaves RFC 9000's
/// every-second-packet rule.
pub fn ack_frequency(ack_every: u32) -> Option<quinn::AckFrequencyConfig> {
    if ack_every == 2 {
        return None;
    }
    let mut cfg = quinn::AckFrequencyConfig::default();
    // The threshold counts packets received *without* an ACK: one less than the period.
    cfg.ack_eliciting_threshold(ack_every.saturating_sub(1).into());
    // A packet out of order is acknowledged at once, as without the extension (whose
    // default waits for two): the ACK that reveals a loss is not delayed.
    cfg.reordering_threshold(1u32.into());
    if ack_every > 2 {
        cfg.max_ack_delay(Some(ACK_DELAY_WHEN_THINNED));
    }
    Some(cfg)
}

/// The congestion window a connection starts with when nothing is resumed (quinn's
/// ten packets).
pub fn default_initial_window() -> u64 {
    use quinn::congestion::ControllerFactory;
    Arc::new(quinn::congestion::CubicConfig::default())
        .build(std::time::Instant::now(), 1200)
        .initial_window()
}

/// The transport settings of `t`, connections starting with a congestion window of
/// `initial_window` bytes when given (careful resume), else with the controller's own.
fn transport_config(
    t: &TransportTuning,
    initial_window: Option<u64>,
) -> Result<quinn::TransportConfig, TransportError> {
    let mut cfg = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)
        .map_err(|e| TransportError::QuicConfig(e.to_string()))?;
    cfg.max_idle_timeout(Some(idle));
    cfg.keep_alive_interval(Some(t.idle_timeout / 3));
    cfg.stream_receive_window(t.stream_window.into());
    cfg.receive_window(t.connection_window.into());
    cfg.send_window(u64::from(t.connection_window));
    cfg.max_concurrent_uni_streams(64u32.into());
    cfg.max_concurrent_bidi_streams(16u32.into());
    cfg.ack_frequency_config(ack_frequency(t.ack_every));
    match t.congestion {
        Congestion::Bbr => {
            let mut bbr = quinn::congestion::BbrConfig::default();
            if let Some(w) = initial_window {
                bbr.initial_window(w);
            }
            cfg.congestion_controller_factory(Arc::new(bbr));
        }
        Congestion::Cubic => {
            let mut cubic = quinn::congestion::CubicConfig::default();
            if let Some(w) = initial_window {
                cubic.initial_window(w);
            }
            cfg.congestion_controller_factory(Arc::new(cubic));
        }
        Congestion::DelayFilteredCubic => {
            let w = initial_window.unwrap_or_else(default_initial_window);
            cfg.congestion_controller_factory(Arc::new(
                crate::congestion::DelayFilteredCubicConfig::new(w),
            ));
        }
    }
    Ok(cfg)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    id: &Identity,
    t: &TransportTuning,
) -> Result<quinn::ServerConfig, TransportError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(id.roots()?),
        provider(),
    )
    .build()
    .map_err(|e| TransportError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs()?, id.key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicServerConfig::try_from(tls).map_err(|e| TransportError::QuicConfig(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(t, None)?));
    Ok(cfg)
}

fn client_config(
    id: &Identity,
    t: &TransportTuning,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.certs()?, id.key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic =
        QuicClientConfig::try_from(tls).map_err(|e| TransportError::QuicConfig(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(t, None)?));
    Ok(cfg)
}

/// A QUIC endpoint that accepts connections from, and connects to, agents of the mesh.
#[derive(Clone)]
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    /// The client side's configuration, and the tuning it was built from: a resumed
    /// connection gets a copy with another initial window.
    client: quinn::ClientConfig,
    tuning: TransportTuning,
}

impl QuicEndpoint {
    /// Binds a server endpoint on `addr` (port 0 picks a free port); it can also dial out.
    pub fn bind(
        addr: SocketAddr,
        id: &Identity,
        tuning: &TransportTuning,
    ) -> Result<Self, TransportError> {
        let socket = udp_socket(addr, tuning.socket_buffer)?;
        let runtime: Arc<dyn quinn::Runtime> = crate::data_plane::DataPlaneRuntime::new()?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config(id, tuning)?),
            socket,
            runtime,
        )
        .map_err(|source| TransportError::Bind { addr, source })?;
        Self::with_client(endpoint, id, tuning)
    }

    /// A client-only endpoint (binds an ephemeral port on the wildcard address of `family_of`).
    pub fn client(
        family_of: SocketAddr,
        id: &Identity,
        tuning: &TransportTuning,
    ) -> Result<Self, TransportError> {
        let bind: SocketAddr = if family_of.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|e: std::net::AddrParseError| TransportError::QuicConfig(e.to_string()))?;
        let socket = udp_socket(bind, tuning.socket_buffer)?;
        let runtime: Arc<dyn quinn::Runtime> = crate::data_plane::DataPlaneRuntime::new()?;
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(|source| TransportError::Bind { addr: bind, source })?;
        Self::with_client(endpoint, id, tuning)
    }

    /// Completes an endpoint with its client side (the default for every connection it
    /// dials, kept for resumed connections to copy).
    fn with_client(
        mut endpoint: quinn::Endpoint,
        id: &Identity,
        tuning: &TransportTuning,
    ) -> Result<Self, TransportError> {
        let client = client_config(id, tuning)?;
        endpoint.set_default_client_config(client.clone());
        Ok(QuicEndpoint {
            endpoint,
            client,
            tuning: tuning.clone(),
        })
    }

    /// Fits `conn`'s send window to its congestion window now ([`send_window_for`], at
    /// most this endpoint's connection window); returns the window set.
    pub fn fit_send_window(&self, conn: &quinn::Connection) -> u64 {
        let path = conn.stats().path;
        let w = send_window_for(path.cwnd, path.rtt, self.tuning.connection_window.into());
        conn.set_send_window(w);
        w
    }

    /// Fits `conn`'s send window to its congestion window alone (at least
    /// [`SEND_WINDOW_TIGHT_MIN`]): what is written is then in flight rather than queued
    /// ahead of the wire. For pre-copy's later rounds when the pause matters more than
    /// their pace; the margin [`fit_send_window`](Self::fit_send_window) adds is for a
    /// congestion window that still has to grow.
    pub fn fit_send_window_tight(&self, conn: &quinn::Connection) -> u64 {
        let w = conn
            .stats()
            .path
            .cwnd
            .max(SEND_WINDOW_TIGHT_MIN)
            .min(self.tuning.connection_window.into());
        conn.set_send_window(w);
        w
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::QuicConfig(e.to_string()))
    }

    /// Connects to a peer. `server_name` must be in the peer certificate's SANs (an IP
    /// address string works when the certificate lists that IP).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connection, TransportError> {
        self.connect_with(self.client.clone(), addr, server_name)
            .await
    }

    /// [`connect`](Self::connect) with the client configuration `cfg`.
    async fn connect_with(
        &self,
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<quinn::Connection, TransportError> {
        let connecting = self
            .endpoint
            .connect_with(cfg, addr, server_name)
            .map_err(|source| TransportError::Connect { addr, source })?;
        connecting
            .await
            .map_err(|source| TransportError::Connection {
                addr: addr.to_string(),
                source,
            })
    }

    /// Connects to an agent at `addr`, naming it by its IP address (agent certificates
    /// list the addresses their agent is reached at).
    pub async fn connect_ip(&self, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        self.connect(addr, &addr.ip().to_string()).await
    }

    /// [`connect_ip`](Self::connect_ip) with the congestion window starting at
    /// `initial_window` bytes (careful resume: [`crate::resume`]); `None` is slow start.
    pub async fn connect_ip_with_window(
        &self,
        addr: SocketAddr,
        initial_window: Option<u64>,
    ) -> Result<quinn::Connection, TransportError> {
        let Some(w) = initial_window else {
            return self.connect_ip(addr).await;
        };
        let mut cfg = self.client.clone();
        cfg.transport_config(Arc::new(transport_config(&self.tuning, Some(w))?));
        self.connect_with(cfg, addr, &addr.ip().to_string()).await
    }

    /// Waits for the next incoming connection and completes its handshake (client
    /// certificate verified). `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<quinn::Connection, TransportError>> {
        let incoming = self.endpoint.accept().await?;
        let addr = incoming.remote_address().to_string();
        Some(
            incoming
                .await
                .map_err(|source| TransportError::Connection { addr, source }),
        )
    }

    /// Waits for the next connection attempt, its handshake not yet done: the caller
    /// completes it (`.await`, with a deadline) or refuses it, on a task of its own, so a
    /// peer that never finishes its handshake holds up nobody else. `None` once the
    /// endpoint is closed.
    pub async fn accept_incoming(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

/// A UDP socket with large buffers: forced past `net.core.*mem_max` when running as root
/// (`SO_*BUFFORCE`), else as large as the limits allow.
fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, TransportError> {
    use std::os::fd::AsRawFd;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    socket
        .set_nonblocking(true)
        .map_err(|source| TransportError::Bind { addr, source })?;
    let fd = socket.as_raw_fd();
    let size = buffer.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: fd is a valid socket; the option value is a c_int that outlives the call.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
    Ok(socket)
}

/// Data kept buffered beyond the congestion window, in time at the window's rate: what
/// covers the encoders' next batches and a scheduling hiccup on a busy host.
pub const SEND_BUFFER_AHEAD: std::time::Duration = std::time::Duration::from_millis(50);

/// ...and at least this many bytes (a few page streams' next batch and a hiccup).
pub const SEND_BUFFER_MIN_MARGIN: u64 = 2 << 20;

/// The least send window [`QuicEndpoint::fit_send_window_tight`] sets.
pub const SEND_WINDOW_TIGHT_MIN: u64 = 64 << 10;

/// The send window (bytes a sender may have written and not yet had acknowledged) for a
/// connection whose congestion window is `cwnd` at round-trip time `rtt`: the window in
/// flight plus [`SEND_BUFFER_AHEAD`] more at its rate (`cwnd / rtt`), at least
/// [`SEND_BUFFER_MIN_MARGIN`] and at least the window itself more, at most `max`. The
/// last: the window is refitted every 250 ms and quinn's controller stops growing once the
/// send window limits it (it counts as application-limited), so slow start on a long path
/// must be able to double between refits.
///
/// A fixed 64 MiB let the page sender run up to 2.7 s ahead of the wire on the testbed's
/// 200 Mbit/s `far` link, and a fixed 8 MiB margin still 0.35 s: a round "ended" when its
/// last page was buffered, and the next one, started then, waited for the buffer to drain
/// while the guest wrote on (benches/RESULTS.md). Fitted to the congestion window, what
/// is written leaves within about 50 ms on any link.
pub fn send_window_for(cwnd: u64, rtt: std::time::Duration, max: u64) -> u64 {
    let rtt = rtt.as_secs_f64().max(1e-6);
    let ahead = cwnd as f64 * SEND_BUFFER_AHEAD.as_secs_f64() / rtt;
    let margin = (ahead.min(max as f64) as u64)
        .max(SEND_BUFFER_MIN_MARGIN)
        .max(cwnd);
    cwnd.saturating_add(margin).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_window_is_the_congestion_window_plus_50_ms_of_it() {
        let ms = std::time::Duration::from_millis;
        const MAX: u64 = 64 << 20;
        // far: 3 MB in flight at 50 ms, 3 MB more (50 ms at 60 MB/s).
        assert_eq!(send_window_for(3_000_000, ms(50), MAX), 6_000_000);
        // wan: 3.4 MB at 20 ms, 2.5x that ahead.
        assert_eq!(
            send_window_for(3_400_000, ms(20), MAX),
            3_400_000 + 8_500_000
        );
        // Slow start: at least the minimum margin.
        assert_eq!(
            send_window_for(12_000, ms(50), MAX),
            12_000 + SEND_BUFFER_MIN_MARGIN
        );
        // A long fat path in slow start (4 MiB at 130 ms): room to double before the
        // next refit.
        assert_eq!(send_window_for(4 << 20, ms(130), MAX), 8 << 20);
        // A short path, and a broken RTT: never beyond the connection's own limit.
        assert_eq!(send_window_for(1 << 20, ms(0), MAX), MAX);
        assert_eq!(send_window_for(u64::MAX, ms(20), MAX), MAX);
    }
}
