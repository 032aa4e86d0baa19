//! Property tests: the frame decoder returns errors, never panics, on arbitrary,
//! truncated and bit-flipped input.

use ferry_wire::{
    Codec, ControlMessage, Frame, PageBatch, PageRun, StreamHeader, ZeroPages, PAGE_SIZE,
};
use proptest::prelude::*;

fn valid_frames() -> Vec<Vec<u8>> {
    let raw: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 7) as u8).collect();
    let runs = [
        PageRun { first: 1, count: 2 },
        PageRun { first: 9, count: 1 },
    ];
    let mut v = Vec::new();
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 1 }] {
        v.push(PageBatch::encode(3, &runs, &raw, codec).unwrap().bytes);
    }
    v.push(ZeroPages::encode(1, &runs).unwrap().bytes);
    v.push(
        Frame::encode_control(&ControlMessage::Hello {
            version: 1,
            migration_id: "m".into(),
            token: "t".into(),
            ram_bytes: 1 << 20,
            page_size: 4096,
            page_streams: 2,
        })
        .unwrap(),
    );
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Frame::decode(&bytes);
        let _ = StreamHeader::decode(&bytes);
        let _ = ControlMessage::from_bytes(&bytes);
    }

    #[test]
    fn random_bodies_with_valid_header_never_panic(ty in 0u8..5, body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut buf = (body.len() as u32).to_le_bytes().to_vec();
        buf.push(ty);
        buf.extend_from_slice(&body);
        let _ = Frame::decode(&buf);
    }

    #[test]
    fn truncated_frames_are_errors(which in 0usize..5, cut in 0usize..20_000) {
        let frames = valid_frames();
        let f = &frames[which];
        let cut = cut % f.len();
        prop_assert!(Frame::decode(&f[..cut]).is_err());
    }

    #[test]
    fn bit_flips_never_panic_and_never_yield_wrong_pages(which in 0usize..4, pos in 0usize..20_000, bit in 0u8..8) {
        let frames = valid_frames();
        let mut f = frames[which].clone();
        let pos = pos % f.len();
        f[pos] ^= 1 << bit;
        if let Ok((Frame::Pages(b), _)) = Frame::decode(&f) {
            // A flip that still decodes must be in the header fields (round, runs),
            // never silently changed page bytes: the CRC covers the data.
            let (orig, _) = Frame::decode(&frames[which]).unwrap();
            if let Frame::Pages(o) = orig {
                prop_assert_eq!(b.data, o.data);
            }
        }
    }
}
