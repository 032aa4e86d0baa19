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
pub async fn relay(
    unix: UnixStream,
    mut send: SendStream,
    mut recv: RecvStream,
) -> std::io::Result<RelayBytes> {
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
    Ok(RelayBytes {
        unix_to_quic: a?,
        quic_to_unix: b.unwrap_or(0),
    })
}

/// The source's device-state relay: reads QEMU's stream to its end as fast as QEMU
/// writes it (so the source QEMU completes — is fenced — without waiting for the link),
/// keeps every byte in `capture` (a file beside the RAM file: with it a fenced QEMU that
/// died can be restarted with `-incoming`), and forwards the bytes to the target on
/// `send` from a task of its own. Returns the bytes captured once QEMU closed its end and
/// the capture is written, plus the forwarding task (bytes sent to the target).
pub async fn relay_capturing(
    unix: UnixStream,
    mut send: SendStream,
    capture: &std::path::Path,
) -> std::io::Result<(u64, tokio::task::JoinHandle<std::io::Result<u64>>)> {
    use tokio::io::AsyncReadExt;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let forward = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(chunk) = rx.recv().await {
            send.write_all(&chunk)
                .await
                .map_err(std::io::Error::other)?;
            n += chunk.len() as u64;
        }
        let _ = send.finish();
        Ok(n)
    });
    let mut file = tokio::fs::File::create(capture).await?;
    let (mut ur, _uw) = unix.into_split();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = ur.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        // The target may have gone: the capture is what matters here.
        let _ = tx.send(bytes::Bytes::copy_from_slice(&buf[..n]));
        total += n as u64;
    }
    file.flush().await?;
    Ok((total, forward))
}
