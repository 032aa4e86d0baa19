//! The cold copy's checkpoint sidecar (JSON beside a partial image, which a crash can
//! leave in any state): any bytes give "start over" or a resume offset within the image.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    sidecar: &'a [u8],
    transfer_id: &'a str,
    expected_len: u64,
    part_len: u64,
}

fuzz_target!(|inp: Input| {
    if let Some(offset) =
        ferry_disk::receive::resume_point(inp.sidecar, inp.transfer_id, inp.expected_len, inp.part_len)
    {
        assert!(offset <= inp.expected_len, "resume beyond the image");
        assert_eq!(inp.part_len, inp.expected_len, "resume only over a full-length part file");
    }
});
