//! The NBD tunnel's receiving side: a byte stream of frames, cut into frames as the
//! stream reader does and fed to `ChunkSequence`, which must accept only contiguous data
//! chunks and never panic or overflow.
#![no_main]

use ferry_wire::{ChunkSequence, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut seq = ChunkSequence::default();
    let mut rest = data;
    let mut total = 0u64;
    while !rest.is_empty() {
        let Ok((frame, used)) = Frame::decode(rest) else {
            return;
        };
        rest = &rest[used..];
        match seq.accept(frame) {
            Ok(bytes) => {
                total += bytes.len() as u64;
                assert_eq!(seq.position(), total, "the stream position is the bytes accepted");
            }
            Err(_) => return,
        }
    }
});
