//! A page batch (or zero-page run list, or data chunk) built from arbitrary runs, round
//! and data, with one bit flipped anywhere in the frame: it must fail to decode or decode
//! to exactly what was sent. A flipped page number that still decoded would write the
//! right bytes to the wrong page.
#![no_main]

use arbitrary::Arbitrary;
use ferry_wire::{Codec, DataChunk, Frame, PageBatch, PageRun, ZeroPages, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    round: u32,
    runs: Vec<(u32, u8)>,
    fill: u8,
    codec: u8,
    kind: u8,
    offset: u64,
    flip_at: u32,
    flip_bit: u8,
}

fuzz_target!(|inp: Input| {
    let runs: Vec<PageRun> = inp
        .runs
        .iter()
        .take(8)
        .map(|&(first, count)| PageRun {
            first: u64::from(first),
            count: u32::from(count % 4) + 1,
        })
        .collect();
    if runs.is_empty() {
        return;
    }
    let pages: usize = runs.iter().map(|r| r.count as usize).sum();
    let raw: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| inp.fill.wrapping_add((i / 512) as u8))
        .collect();
    let codec = match inp.codec % 3 {
        0 => Codec::None,
        1 => Codec::Lz4,
        _ => Codec::Zstd { level: 1 },
    };
    let good = match inp.kind % 3 {
        0 => match PageBatch::encode(inp.round, &runs, &raw, codec) {
            Ok(b) => b.bytes,
            Err(_) => return,
        },
        1 => match ZeroPages::encode(inp.round, &runs) {
            Ok(b) => b.bytes,
            Err(_) => return,
        },
        _ => match DataChunk::encode(inp.offset, &raw[..raw.len().min(ferry_wire::MAX_CHUNK)], codec) {
            Ok(b) => b,
            Err(_) => return,
        },
    };
    let (sent, _) = Frame::decode(&good).expect("an encoded frame decodes");
    let mut bad = good.clone();
    let at = inp.flip_at as usize % bad.len();
    bad[at] ^= 1 << (inp.flip_bit % 8);
    if let Ok((got, _)) = Frame::decode(&bad) {
        // A flip that still decodes must have changed nothing that reaches guest RAM.
        match (&sent, &got) {
            (Frame::Pages(a), Frame::Pages(b)) => {
                assert_eq!((a.round, &a.runs, &a.data), (b.round, &b.runs, &b.data), "flip at {at} went unnoticed")
            }
            (Frame::ZeroPages(a), Frame::ZeroPages(b)) => assert_eq!(a, b, "flip at {at} went unnoticed"),
            (Frame::Chunk(a), Frame::Chunk(b)) => {
                assert_eq!((a.offset, &a.data), (b.offset, &b.data), "flip at {at} went unnoticed")
            }
            (a, b) => panic!("flip at {at} changed the frame type: {a:?} -> {b:?}"),
        }
    }
});
