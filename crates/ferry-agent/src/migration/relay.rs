//! QEMU's device state between the source QEMU's migration socket, QUIC and the target
//! QEMU's: one way (no return path, see the fence), as [`DataChunk`] frames compressed with
//! the migration's codec. The state is ~0.3 MB, mostly the ROMs QEMU sends as RAM blocks of
//! its own; zstd-1 makes it 2.4x smaller, and it crosses the link inside the guest's pause
//! beside the last pages (190 KB less is 1.6 ms on a 1 Gbit/s link, 8 ms at 200 Mbit/s).
//! The chunk encoding and decoding of a byte stream here also carry the NBD tunnel
//! (`disks::tunnel`).

use ferry_transport::{FrameReader, FrameWriter};
use ferry_wire::{ChunkSequence, Codec, DataChunk};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Chunks this small travel raw: compressing them saves too little to wait for.
const MIN_COMPRESSED_CHUNK: usize = 4096;

/// Chunks at least this big are compressed on the blocking pool; smaller ones inline
/// (NBD requests and replies are mostly small, and latency matters for them).
const BLOCKING_POOL_CHUNK: usize = 64 * 1024;

/// Encodes `data`, the bytes of a stream at `pos`, as one [`DataChunk`] frame: compressed
/// with `codec` when that can pay. Shared by the device-state relay and the NBD tunnel.
pub async fn encode_stream_chunk(pos: u64, data: &[u8], codec: Codec) -> Result<Vec<u8>, String> {
    let codec = if data.len() >= MIN_COMPRESSED_CHUNK {
        codec
    } else {
        Codec::None
    };
    if data.len() >= BLOCKING_POOL_CHUNK && codec != Codec::None {
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || DataChunk::encode(pos, &data, codec))
            .await
            .map_err(|e| e.to_string())?
    } else {
        DataChunk::encode(pos, data, codec)
    }
    .map_err(|e| e.to_string())
}

/// Writes the byte stream arriving on `recv` as [`DataChunk`] frames into `w` until the
/// sender finishes it (then shuts `w` down); a gap, an overlap or a corrupt frame ends it
/// with an error naming `stream`, a failed write one naming `sink`. Returns the bytes
/// written. Shared by the target's device-state relay and the NBD tunnel.
pub async fn write_stream_chunks(
    recv: RecvStream,
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    stream: &str,
    sink: &str,
) -> Result<u64, String> {
    let mut r = FrameReader::new(recv);
    let mut seq = ChunkSequence::default();
    while let Some(frame) = r.next().await.map_err(|e| format!("{stream}: {e}"))? {
        let data = seq.accept(frame).map_err(|e| format!("{stream}: {e}"))?;
        w.write_all(&data)
            .await
            .map_err(|e| format!("{sink}: {e}"))?;
    }
    let _ = w.shutdown().await;
    Ok(seq.position())
}

/// The target's side: writes the device state arriving on `recv` into the target QEMU's
/// migration socket until the source finishes the stream. Returns the bytes written.
pub async fn relay_to_qemu(unix: UnixStream, recv: RecvStream) -> Result<u64, String> {
    let (_ur, mut uw) = unix.into_split();
    write_stream_chunks(
        recv,
        &mut uw,
        "device-state stream",
        "target QEMU's migration socket",
    )
    .await
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
            let frame = encode_stream_chunk(pos, &chunk, codec)
                .await
                .map_err(std::io::Error::other)?;
            w.write_owned(frame).await.map_err(std::io::Error::other)?;
            pos += chunk.len() as u64;
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
