//! QEMU's device state between the source QEMU's migration socket, QUIC and the target
//! QEMU's: one way (no return path, see the fence), as [`DataChunk`] frames compressed with
//! the migration's codec. The state is ~0.3 MB, mostly the ROMs QEMU sends as RAM blocks of
//! its own; zstd-1 makes it 2.4x smaller, and it crosses the link inside the guest's pause
//! beside the last pages (190 KB less is 1.6 ms on a 1 Gbit/s link, 8 ms at 200 Mbit/s).

use ferry_transport::{FrameReader, FrameWriter};
use ferry_wire::{ChunkSequence, Codec, DataChunk};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Chunks this small travel raw: compressing them saves too little to wait for.
const MIN_COMPRESSED_CHUNK: usize = 4096;

/// The target's side: writes the device state arriving on `recv` into the target QEMU's
/// migration socket until the source finishes the stream. Returns the bytes written.
pub async fn relay_to_qemu(unix: UnixStream, recv: RecvStream) -> Result<u64, String> {
    let (_ur, mut uw) = unix.into_split();
    let mut r = FrameReader::new(recv);
    let mut seq = ChunkSequence::default();
    while let Some(frame) = r
        .next()
        .await
        .map_err(|e| format!("device-state stream: {e}"))?
    {
        let data = seq
            .accept(frame)
            .map_err(|e| format!("device-state stream: {e}"))?;
        uw.write_all(&data)
            .await
            .map_err(|e| format!("target QEMU's migration socket: {e}"))?;
    }
    let _ = uw.shutdown().await;
    Ok(seq.position())
}

/// The source's device-state relay: reads QEMU's stream to its end as fast as QEMU
/// writes it (so the source QEMU completes — is fenced — without waiting for the link),
/// keeps every byte in `capture` (a file beside the RAM file: with it a fenced QEMU that
/// died can be restarted with `-incoming`), and forwards the bytes to the target on
/// `send` from a task of its own. Returns the bytes captured once QEMU closed its end and
/// the capture is written, plus the forwarding task (bytes sent to the target).
pub async fn relay_capturing(
    unix: UnixStream,
    send: SendStream,
    codec: Codec,
    capture: &std::path::Path,
) -> std::io::Result<(u64, tokio::task::JoinHandle<std::io::Result<u64>>)> {
    use tokio::io::AsyncReadExt;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let forward = tokio::spawn(async move {
        let mut w = FrameWriter::new(send);
        let mut pos = 0u64;
        while let Some(chunk) = rx.recv().await {
            let c = if chunk.len() >= MIN_COMPRESSED_CHUNK {
                codec
            } else {
                Codec::None
            };
            let frame = tokio::task::spawn_blocking(move || {
                DataChunk::encode(pos, &chunk, c).map(|f| (f, chunk.len()))
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)?;
            w.write_owned(frame.0)
                .await
                .map_err(std::io::Error::other)?;
            pos += frame.1 as u64;
        }
        let _ = w.finish();
        Ok(w.bytes_written)
    });
    let mut file = tokio::fs::File::create(capture).await?;
    let (mut ur, _uw) = unix.into_split();
    let mut total = 0u64;
    // At most one chunk's worth (MAX_CHUNK is 1 MiB).
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
