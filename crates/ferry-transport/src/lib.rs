//! ferry's data plane transport: QUIC (quinn) with mutual TLS (rustls), a development
//! PKI (rcgen), and typed reading/writing of ferry-wire frames on QUIC streams, all of it
//! on a thread of its own ([`data_plane`]).
//!
//! Every agent of a mesh holds a certificate issued by the mesh's CA; a connection is
//! accepted only when both ends present a certificate from that CA.

pub mod congestion;
pub mod data_plane;
pub mod identity;
pub mod pki;
mod quic;
pub mod resume;
mod stream;

pub use identity::{PeerIdentity, Role};
pub use quic::{
    default_initial_window, send_window_for, Congestion, QuicEndpoint, TransportTuning, ALPN,
    SEND_BUFFER_AHEAD, SEND_BUFFER_MIN_MARGIN,
};
pub use stream::{
    read_stream_header, write_stream_header, ControlChannel, FrameReader, FrameWriter,
};

pub use quinn::{Connection, RecvStream, SendStream};

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("no {what} found in {path}")]
    EmptyPem { what: &'static str, path: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("QUIC configuration: {0}")]
    QuicConfig(String),
    #[error("binding QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("QUIC connection to {addr} failed: {source}")]
    Connection {
        addr: String,
        source: quinn::ConnectionError,
    },
    #[error("QUIC stream: {0}")]
    Stream(String),
    #[error("peer closed the stream")]
    Closed,
    #[error("wire format: {0}")]
    Wire(#[from] ferry_wire::WireError),
    #[error("unexpected frame on {0} stream")]
    UnexpectedFrame(&'static str),
    #[error("{0:?} is not a valid certificate name (1-64 of [A-Za-z0-9._-])")]
    BadName(String),
    #[error("certificate generation: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("data plane: {0}")]
    DataPlane(String),
    #[error("writing {path}: {source}")]
    WriteFile {
        path: String,
        source: std::io::Error,
    },
}
