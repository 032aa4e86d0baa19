//! Byte relay between a QEMU migration socket (unix) and a QUIC bidirectional stream.
//! QEMU's device state flows one way, its return path the other.

use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayBytes {
    /// From QEMU's socket to QUIC.
    pub unix_to_quic: u64,
    /// From QUIC to QEMU's socket.
    pub quic_to_unix: u64,
}

/// Copies both directions until both ends are finished.
pub async fn relay(unix: UnixStream, mut send: SendStream, mut recv: RecvStream) -> std::io::Result<RelayBytes> {
    let (mut ur, mut uw) = unix.into_split();
    let up = async {
        let n = tokio::io::copy(&mut ur, &mut send).await?;
        let _ = send.finish();
        Ok::<u64, std::io::Error>(n)
    };
    let down = async {
        let n = tokio::io::copy(&mut recv, &mut uw).await?;
        let _ = uw.shutdown().await;
        Ok::<u64, std::io::Error>(n)
    };
    let (a, b) = tokio::join!(up, down);
    Ok(RelayBytes { unix_to_quic: a?, quic_to_unix: b.unwrap_or(0) })
}
