//! End-to-end transfers through the public API: ChunkReader on the source, PartialImage on
//! the target, BLAKE3 at the end. Real files, real qemu-img / qemu-io.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_disk::{
    compare, create, file_blake3, inspect, Blake3Digest, ChunkReader, DiskError, ImageFormat,
    PartialImage, DEFAULT_CHUNK_SIZE,
};

const MIB: u64 = 1 << 20;

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A 64 MiB sparse raw file: random islands (some unaligned, one straddling a chunk
/// boundary), written zero regions, holes everywhere else, a non-zero last byte.
fn make_source(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    let f = File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut rng = Rng(0x00f3_7729_c0ff_ee11);
    let islands: [(u64, usize); 6] = [
        (0, 4096),
        (3 * MIB + 17, 100_000),
        (10 * MIB - 5000, 10_000),
        (20 * MIB, 3 * MIB as usize),
        (41 * MIB + 123, 1),
        (64 * MIB - 1, 1),
    ];
    for (off, len) in islands {
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        buf[0] |= 1; // never a zero byte at the island's start
        f.write_all_at(&buf, off).unwrap();
    }
    // Allocated but zero: the reader must read these and skip them.
    f.write_all_at(&vec![0u8; 4 * MIB as usize], 30 * MIB)
        .unwrap();
    f.write_all_at(&vec![0u8; 512 * 1024], 50 * MIB + 4096)
        .unwrap();
    f.sync_all().unwrap();
    p
}

/// Send chunks from `reader` into `img`, checkpointing every `every` bytes of source
/// position; stop after `max_chunks` chunks if given. Returns chunks sent.
fn pump(
    reader: &mut ChunkReader,
    img: &mut PartialImage,
    every: u64,
    max_chunks: Option<usize>,
) -> usize {
    let mut sent = 0;
    let mut last_cp = img.resume_offset();
    for chunk in reader.by_ref() {
        let chunk = chunk.unwrap();
        img.write_chunk(chunk.offset, &chunk.data).unwrap();
        sent += 1;
        let pos = chunk.offset + chunk.data.len() as u64;
        if pos - last_cp >= every {
            img.checkpoint(pos).unwrap();
            last_cp = pos;
        }
        if Some(sent) == max_chunks {
            return sent;
        }
    }
    img.checkpoint(reader.scanned_to()).unwrap();
    sent
}

fn same_content(a: &Path, b: &Path) -> bool {
    fs::read(a).unwrap() == fs::read(b).unwrap()
}

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn sparse_raw_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let digest = file_blake3(&src).unwrap();
    assert_eq!(digest, Blake3Digest::of_bytes(&fs::read(&src).unwrap()));

    let dst_dir = dir.path().join("target");
    fs::create_dir(&dst_dir).unwrap();
    let fin = dst_dir.join("vda.raw");
    let mut reader = ChunkReader::open(&src, 0).unwrap();
    let mut img = PartialImage::open_or_resume(&fin, reader.file_len(), "xfer-1").unwrap();
    assert_eq!(img.resume_offset(), 0);
    let sent = pump(&mut reader, &mut img, 8 * MIB, None);

    let s = reader.stats();
    assert_eq!(s.chunks_sent as usize, sent);
    assert_eq!(s.bytes_sent + s.bytes_zero + s.bytes_hole, 64 * MIB);
    assert_eq!(s.bytes_read, s.bytes_sent + s.bytes_zero);
    assert!(s.bytes_zero >= 4 * MIB, "{s:?}");
    assert!(s.bytes_sent <= 12 * MIB, "{s:?}");
    assert!(s.bytes_hole >= 40 * MIB, "{s:?}");

    let out = img.finish(digest).unwrap();
    assert_eq!(out, fin);
    assert!(same_content(&src, &fin));
    assert_eq!(fs::metadata(&fin).unwrap().len(), 64 * MIB);
    // Sparse: only the chunks sent are allocated (the written zeros became holes).
    assert!(
        allocated(&fin) <= s.bytes_sent + MIB,
        "{} allocated",
        allocated(&fin)
    );
    assert!(allocated(&fin) < allocated(&src));
    // Nothing left beside it.
    let names: Vec<_> = fs::read_dir(&dst_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["vda.raw"]);
    // qemu-img agrees.
    assert!(compare(&src, &fin).unwrap());
}

#[test]
fn interrupted_transfer_resumes_from_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let digest = file_blake3(&src).unwrap();
    let fin = dir.path().join("dst.raw");
    let total = ChunkReader::open(&src, 0).unwrap().count();
    assert!(total >= 8, "{total} chunks");

    // First attempt: half the chunks, checkpoint, then the "connection drops".
    let mut reader = ChunkReader::open(&src, 0).unwrap();
    let mut img = PartialImage::open_or_resume(&fin, reader.file_len(), "xfer-2").unwrap();
    let mut sent = 0;
    let mut checkpoint = 0;
    for chunk in reader.by_ref().take(total / 2) {
        let chunk = chunk.unwrap();
        img.write_chunk(chunk.offset, &chunk.data).unwrap();
        checkpoint = chunk.offset + chunk.data.len() as u64;
        sent += 1;
    }
    img.checkpoint(checkpoint).unwrap();
    // One more chunk written but never checkpointed: it will be sent again.
    let extra = reader.next().unwrap().unwrap();
    img.write_chunk(extra.offset, &extra.data).unwrap();
    drop(img);
    assert!(checkpoint > 0 && checkpoint < 64 * MIB);
    assert_eq!(checkpoint % DEFAULT_CHUNK_SIZE as u64, 0);

    // Second attempt.
    let mut img = PartialImage::open_or_resume(&fin, 64 * MIB, "xfer-2").unwrap();
    assert!(img.resumed());
    assert_eq!(img.resume_offset(), checkpoint);
    let mut reader = ChunkReader::open(&src, img.resume_offset()).unwrap();
    sent += pump(&mut reader, &mut img, 4 * MIB, None);
    assert_eq!(
        sent, total,
        "every chunk sent exactly once across both attempts"
    );
    let s = reader.stats();
    assert_eq!(
        s.bytes_sent + s.bytes_zero + s.bytes_hole,
        64 * MIB - checkpoint
    );
    img.finish(digest).unwrap();
    assert!(same_content(&src, &fin));
}

#[test]
fn other_transfer_id_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let fin = dir.path().join("dst.raw");

    let mut reader = ChunkReader::open(&src, 0).unwrap();
    let mut img = PartialImage::open_or_resume(&fin, 64 * MIB, "old").unwrap();
    pump(&mut reader, &mut img, MIB, Some(3));
    assert!(img.resume_offset() > 0);
    drop(img);

    let mut img = PartialImage::open_or_resume(&fin, 64 * MIB, "new").unwrap();
    assert!(!img.resumed());
    assert_eq!(img.resume_offset(), 0);
    assert_eq!(img.transfer_id(), "new");
    // The old content is gone: the part is one hole again.
    assert!(allocated(img.part_path()) < MIB);
    let mut reader = ChunkReader::open(&src, 0).unwrap();
    pump(&mut reader, &mut img, 16 * MIB, None);
    img.finish(file_blake3(&src).unwrap()).unwrap();
    assert!(same_content(&src, &fin));
}

#[test]
fn digest_mismatch_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let dst_dir = dir.path().join("target");
    fs::create_dir(&dst_dir).unwrap();
    let fin = dst_dir.join("vda.raw");
    let mut reader = ChunkReader::open(&src, 0).unwrap();
    let mut img = PartialImage::open_or_resume(&fin, 64 * MIB, "xfer-3").unwrap();
    // Lose one chunk on the way.
    let mut dropped = false;
    for chunk in reader.by_ref() {
        let chunk = chunk.unwrap();
        if !dropped && chunk.offset > 0 {
            dropped = true;
            continue;
        }
        img.write_chunk(chunk.offset, &chunk.data).unwrap();
    }
    assert!(dropped);
    let expected = file_blake3(&src).unwrap();
    let err = img.finish(expected).unwrap_err();
    match &err {
        DiskError::DigestMismatch {
            path,
            expected: e,
            actual,
        } => {
            assert_eq!(path, &fin);
            assert_eq!(*e, expected);
            assert_ne!(*actual, expected);
        }
        other => panic!("expected DigestMismatch, got {other}"),
    }
    assert!(err.to_string().contains(&expected.to_string()), "{err}");
    assert_eq!(
        fs::read_dir(&dst_dir).unwrap().count(),
        0,
        "no final, part or sidecar"
    );
}

#[test]
fn qcow2_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    create(&src, ImageFormat::Qcow2, 64 * MIB, None).unwrap();
    for cmd in [
        "write -P 0xab 1M 4M",
        "write -P 0x5c 40M 64k",
        "write -z 2M 1M",
    ] {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
    }
    let info = inspect(&src).unwrap();
    assert_eq!(info.format, ImageFormat::Qcow2);
    assert_eq!(info.virtual_size, 64 * MIB);

    let fin = dir.path().join("dst.qcow2");
    let mut reader = ChunkReader::open(&src, 0).unwrap();
    let mut img = PartialImage::open_or_resume(&fin, reader.file_len(), "xfer-q").unwrap();
    pump(&mut reader, &mut img, 2 * MIB, None);
    img.finish(file_blake3(&src).unwrap()).unwrap();

    assert!(compare(&src, &fin).unwrap());
    let out_info = inspect(&fin).unwrap();
    assert_eq!(out_info.format, ImageFormat::Qcow2);
    assert_eq!(out_info.virtual_size, 64 * MIB);
    // And it differs from an empty image of the same size, so compare is not vacuous.
    let empty = dir.path().join("empty.qcow2");
    create(&empty, ImageFormat::Qcow2, 64 * MIB, None).unwrap();
    assert!(!compare(&empty, &fin).unwrap());
}
