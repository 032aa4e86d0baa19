//! Typed reading and writing of ferry-wire frames on QUIC streams.

use crate::TransportError;
use ferry_wire::{
    ControlMessage, Frame, FrameType, StreamHeader, FRAME_HEADER_LEN, STREAM_HEADER_LEN,
};
use quinn::{ReadExactError, RecvStream, SendStream};

fn read_err(e: ReadExactError) -> TransportError {
    match e {
        ReadExactError::FinishedEarly(_) => TransportError::Closed,
        ReadExactError::ReadError(e) => stream_err(e),
    }
}

/// A stream error with its causes: quinn's "connection lost" alone hides why, and a peer
/// that closes the connection says why in its close reason ("closed by peer: 3: ...").
fn stream_err(e: impl std::error::Error) -> TransportError {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    TransportError::Stream(text)
}

/// Writes the stream header that opens every stream.
pub async fn write_stream_header(
    send: &mut SendStream,
    header: StreamHeader,
) -> Result<(), TransportError> {
    send.write_all(&header.encode()).await.map_err(stream_err)
}

/// Reads and validates the stream header.
pub async fn read_stream_header(recv: &mut RecvStream) -> Result<StreamHeader, TransportError> {
    let mut b = [0u8; STREAM_HEADER_LEN];
    recv.read_exact(&mut b).await.map_err(read_err)?;
    Ok(StreamHeader::decode(&b)?)
}

/// Reads frames from a stream, enforcing the frame size limit before allocating.
pub struct FrameReader {
    recv: RecvStream,
    body: Vec<u8>,
    /// Bytes read from the stream so far.
    pub bytes_read: u64,
}

impl FrameReader {
    pub fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            body: Vec::new(),
            bytes_read: 0,
        }
    }

    /// Next frame; `Ok(None)` when the peer finished the stream cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut body = std::mem::take(&mut self.body);
        let got = self.next_body(&mut body).await;
        let frame = match got {
            Ok(Some(ty)) => Frame::decode_body(ty, &body).map(Some).map_err(Into::into),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        self.body = body;
        frame
    }

    /// Next frame's type, its body read (undecoded) into `body`: for a receiver that
    /// decodes off the async runtime (decompressing is CPU work). `Ok(None)` when the peer
    /// finished the stream cleanly between frames.
    pub async fn next_body(
        &mut self,
        body: &mut Vec<u8>,
    ) -> Result<Option<FrameType>, TransportError> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        match self.recv.read_exact(&mut h).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(read_err(e)),
        }
        let (ty, len) = Frame::parse_header(&h)?;
        body.resize(len, 0);
        self.recv.read_exact(body).await.map_err(read_err)?;
        self.bytes_read += (FRAME_HEADER_LEN + len) as u64;
        Ok(Some(ty))
    }

    /// Stops the peer from sending more (used when aborting).
    pub fn stop(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }
}

/// Writes already-encoded frames.
pub struct FrameWriter {
    send: SendStream,
    /// Bytes written so far.
    pub bytes_written: u64,
}

impl FrameWriter {
    pub fn new(send: SendStream) -> Self {
        FrameWriter {
            send,
            bytes_written: 0,
        }
    }

    pub async fn write(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.send.write_all(frame).await.map_err(stream_err)?;
        self.bytes_written += frame.len() as u64;
        Ok(())
    }

    /// Writes an encoded frame handed over whole: quinn keeps the buffer instead of
    /// copying it into its send queue.
    pub async fn write_owned(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        let len = frame.len() as u64;
        self.send
            .write_chunk(bytes::Bytes::from(frame))
            .await
            .map_err(stream_err)?;
        self.bytes_written += len;
        Ok(())
    }

    /// Finishes the stream and waits (up to `limit`) until the peer has it all: what was
    /// written last then survives a connection close that follows.
    pub async fn finish_and_flush(&mut self, limit: std::time::Duration) {
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(limit, self.send.stopped()).await;
        }
    }

    /// Finishes the stream (the reader then sees a clean end).
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.send.finish().map_err(stream_err)
    }
}

/// The control stream: request/response messages in both directions.
pub struct ControlChannel {
    writer: FrameWriter,
    reader: FrameReader,
}

impl ControlChannel {
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        ControlChannel {
            writer: FrameWriter::new(send),
            reader: FrameReader::new(recv),
        }
    }

    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), TransportError> {
        self.writer.write(&Frame::encode_control(msg)?).await
    }

    /// Next control message; a closed stream is [`TransportError::Closed`].
    pub async fn recv(&mut self) -> Result<ControlMessage, TransportError> {
        match self.reader.next().await? {
            Some(Frame::Control(m)) => Ok(m),
            Some(_) => Err(TransportError::UnexpectedFrame("control")),
            None => Err(TransportError::Closed),
        }
    }

    /// Splits into halves so one task can send while another receives.
    pub fn split(self) -> (FrameWriter, FrameReader) {
        (self.writer, self.reader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn a_stream_error_carries_its_causes() {
        let e = Layer(
            "connection lost",
            Some(Box::new(Layer("closed by peer: 3: no room", None))),
        );
        match stream_err(e) {
            TransportError::Stream(t) => {
                assert_eq!(t, "connection lost: closed by peer: 3: no room")
            }
            other => panic!("{other:?}"),
        }
    }
}
