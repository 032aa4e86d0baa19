//! The frame decoder on arbitrary input, structured so bodies are reached: the input picks
//! a frame type and supplies a body, and the frame header is written with the body's true
//! length (a random header would almost always be rejected by its length alone). The raw
//! input is also decoded as it is, and as a stream header.
#![no_main]

use ferry_wire::{Frame, FrameType, StreamHeader, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Frame::decode(data);
    let _ = StreamHeader::decode(data);
    let Some((&ty, body)) = data.split_first() else {
        return;
    };
    // Types 1..=4 exist; keep a few unknown ones in the mix.
    let ty = ty % 6;
    if body.len() > MAX_FRAME_BODY {
        return;
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.push(ty);
    frame.extend_from_slice(body);
    if let Ok((f, used)) = Frame::decode(&frame) {
        assert_eq!(used, frame.len(), "a decoded frame consumes its whole body");
        // Whatever decodes is consistent with itself.
        if let Frame::Pages(b) = &f {
            assert_eq!(b.data.len(), b.page_count() * ferry_wire::PAGE_SIZE);
        }
    }
    if let Ok((t, _)) = Frame::parse_header(&frame) {
        let _: Result<Frame, _> = Frame::decode_body(t, body);
        let _ = matches!(t, FrameType::Control);
    }
});
