//! Codec micro-benchmarks on captured guest RAM (project issue 4).
//!
//! Corpus: `scripts/capture-guest-ram.sh --mix realistic,idle` writes
//! `build/corpus/guest-ram-{realistic,idle}.bin` (or set `FERRY_CORPUS_DIR`). Without a
//! corpus this benchmark says so and exits cleanly.
//!
//! Per corpus, on one core unless said otherwise (throughput counts raw page bytes):
//! * `<corpus>/compress/<codec>` and `<corpus>/decompress/<codec>`: `ferry_wire::Codec` on
//!   the corpus's non-zero pages in 256-page (1 MiB) batches, the batch ferry sends; one
//!   iteration is one batch, cycling through all of them. A batch that does not shrink
//!   travels raw, so its "decompression" is a copy, as on the target. `none` is the copy
//!   of a batch (what a raw batch costs).
//! * `<corpus>/zero-check/page-4k`: the all-zero check ferry's sender runs on each page it
//!   reads, on a zero page (the slowest case: every word is read).
//! * `<corpus>/zero-check/nonzero_pages-{sparse,dense}`: `RamFile::nonzero_pages` over
//!   the whole RAM file, counted in guest RAM bytes. `sparse` is the captured file (its
//!   zero pages are holes, skipped with SEEK_DATA); `dense` is a copy in /dev/shm with
//!   every page allocated (every page read).
//! * `<corpus>/fingerprint/{1,2}-threads-{sparse,dense}`: `RamFile::fingerprint`, the
//!   check ferry computes while the guest is paused, counted in guest RAM bytes.
//!
//! Ratios are printed once per codec and written to `target/ferry-bench/codecs.json`.

use criterion::{Criterion, SamplingMode, Throughput};
use ferry_bench::{
    compress_all, corpus_dir, corpus_file, is_zero_page, report_dir, CodecSummary, Corpus,
    BATCH_BYTES, CODECS, CORPORA, CORPUS_ENV, PAGE_SIZE,
};
use ferry_wire::{Codec, PageBatch, PageRun};
use std::hint::black_box;

fn main() {
    let dir = corpus_dir();
    let found: Vec<(&str, std::path::PathBuf)> = CORPORA
        .iter()
        .map(|n| (*n, corpus_file(&dir, n)))
        .filter(|(_, p)| p.is_file())
        .collect();
    if found.is_empty() {
        eprintln!(
            "codecs: no guest RAM corpus in {} (guest-ram-{{{}}}.bin).\n\
             codecs: capture one with `scripts/capture-guest-ram.sh --mix realistic,idle` \
             (or point {CORPUS_ENV} at a directory holding them); nothing measured.",
            dir.display(),
            CORPORA.join(",")
        );
        return;
    }
    for n in CORPORA {
        if !found.iter().any(|(f, _)| f == n) {
            eprintln!(
                "codecs: no {} corpus: skipped",
                corpus_file(&dir, n).display()
            );
        }
    }

    let mut c = Criterion::default().configure_from_args();
    let mut report = Vec::new();
    for (name, path) in &found {
        let corpus = match Corpus::load(name, path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("codecs: cannot load {}: {e}", path.display());
                std::process::exit(1);
            }
        };
        report.push(bench_corpus(&mut c, &corpus));
    }
    write_report(&report);
    c.final_summary();
}

struct CorpusReport {
    name: String,
    ram_bytes: u64,
    nonzero_pages: u64,
    total_pages: u64,
    codecs: Vec<CodecSummary>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn bench_corpus(c: &mut Criterion, corpus: &Corpus) -> CorpusReport {
    let name = corpus.name.as_str();
    let batches = corpus.batches();
    eprintln!(
        "codecs: {name}: {} ({:.0} MiB guest RAM), {} of {} pages non-zero ({:.1}%, {:.1} MiB), {} batches of up to {} KiB",
        corpus.path.display(),
        mib(corpus.ram_bytes()),
        corpus.nonzero_pages(),
        corpus.total_pages(),
        100.0 * corpus.nonzero_pages() as f64 / corpus.total_pages().max(1) as f64,
        mib(corpus.pages.len() as u64),
        batches.len(),
        BATCH_BYTES >> 10,
    );
    if batches.is_empty() {
        eprintln!("codecs: {name}: no non-zero pages, skipped");
        return CorpusReport {
            name: name.into(),
            ram_bytes: corpus.ram_bytes(),
            nonzero_pages: 0,
            total_pages: corpus.total_pages(),
            codecs: Vec::new(),
        };
    }
    let batch_len = batches[0].len();
    let largest = batches.iter().map(|b| b.len()).max().unwrap_or(batch_len);

    // Ratios once per codec, and the blocks the decompression benchmarks decode.
    let mut summaries = Vec::new();
    let mut encoded: Vec<Vec<(Codec, Option<Vec<u8>>)>> = Vec::new();
    for (cname, codec) in CODECS {
        let (s, blocks) = compress_all(cname, *codec, &batches).expect("compress corpus");
        eprintln!(
            "codecs: {name}: {cname:<7} ratio {:.3} ({:.1} MiB -> {:.1} MiB; {} of {} batches travel raw)",
            s.ratio(),
            mib(s.raw_bytes),
            mib(s.payload_bytes),
            s.raw_batches,
            s.batches
        );
        encoded.push(blocks.into_iter().map(|b| (*codec, b)).collect());
        summaries.push(s);
    }

    // One batch takes 0.05-3 ms: 30 flat samples fit a 3 s measurement.
    each_codec_per_batch(
        c,
        &format!("{name}/compress"),
        &batches,
        |codec, batch| match codec {
            Codec::None => black_box(black_box(batch).to_vec()).len(),
            _ => black_box(codec.compress(black_box(batch)).expect("compress"))
                .map_or(0, |v| v.len()),
        },
    );
    // The whole page frame the sender builds from a batch (`PageBatch::encode`: header,
    // CRC, compression, payload in the frame), one batch per iteration.
    each_codec_per_batch(c, &format!("{name}/frame"), &batches, |codec, batch| {
        let runs = [PageRun {
            first: 0,
            count: (batch.len() / PAGE_SIZE) as u32,
        }];
        let f = PageBatch::encode(0, &runs, black_box(batch), codec).expect("encode");
        black_box(f.bytes).len()
    });

    let mut g = c.benchmark_group(format!("{name}/decompress"));
    g.throughput(Throughput::BytesDecimal(batch_len as u64));
    g.sampling_mode(SamplingMode::Flat).sample_size(30);
    for ((cname, _), blocks) in CODECS.iter().zip(&encoded) {
        let mut out = vec![0u8; largest];
        let mut i = 0usize;
        g.bench_function(cname.replace(':', "-"), |b| {
            b.iter(|| {
                let k = i % blocks.len();
                i += 1;
                let raw = batches[k];
                let dst = &mut out[..raw.len()];
                match &blocks[k] {
                    (codec, Some(packed)) => codec.decompress_into(black_box(packed), dst),
                    (_, None) => Codec::None.decompress_into(black_box(raw), dst),
                }
                .expect("decompress");
                black_box(&out);
            })
        });
    }
    g.finish();

    // Whole-file scans: each iteration covers the guest's whole RAM.
    let dense = corpus
        .dense_copy()
        .expect("dense copy of the RAM file in /dev/shm");
    let ram_bytes = corpus.ram_bytes();

    let mut g = c.benchmark_group(format!("{name}/zero-check"));
    g.throughput(Throughput::BytesDecimal(PAGE_SIZE as u64));
    let zero = vec![0u8; PAGE_SIZE];
    g.bench_function("page-4k", |b| b.iter(|| is_zero_page(black_box(&zero))));
    g.throughput(Throughput::BytesDecimal(ram_bytes));
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.bench_function("nonzero_pages-sparse", |b| {
        b.iter(|| corpus.ram.nonzero_pages().expect("scan").count())
    });
    g.bench_function("nonzero_pages-dense", |b| {
        b.iter(|| dense.nonzero_pages().expect("scan").count())
    });
    g.finish();

    let mut g = c.benchmark_group(format!("{name}/fingerprint"));
    g.throughput(Throughput::BytesDecimal(ram_bytes));
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    for threads in [1usize, 2] {
        let label = if threads == 1 {
            "1-thread"
        } else {
            "2-threads"
        };
        g.bench_function(format!("{label}-sparse"), |b| {
            b.iter(|| corpus.ram.fingerprint(threads).expect("fingerprint"))
        });
        g.bench_function(format!("{label}-dense"), |b| {
            b.iter(|| dense.fingerprint(threads).expect("fingerprint"))
        });
    }
    g.finish();
    // Same content, same fingerprint: holes and explicit zero pages are alike to it.
    assert_eq!(
        corpus.ram.fingerprint(2).ok(),
        dense.fingerprint(1).ok(),
        "fingerprint of the dense copy differs"
    );

    CorpusReport {
        name: name.into(),
        ram_bytes,
        nonzero_pages: corpus.nonzero_pages(),
        total_pages: corpus.total_pages(),
        codecs: summaries,
    }
}

/// `target/ferry-bench/codecs.json`: the corpus sizes and codec ratios (criterion keeps
/// the timings under `target/criterion/`).
/// One flat benchmark group, `title`/<codec> for each of [`CODECS`]: each iteration runs
/// `work` on the next batch, cycling through them (throughput in raw batch bytes).
fn each_codec_per_batch(
    c: &mut Criterion,
    title: &str,
    batches: &[&[u8]],
    mut work: impl FnMut(Codec, &[u8]) -> usize,
) {
    let mut g = c.benchmark_group(title);
    g.throughput(Throughput::BytesDecimal(batches[0].len() as u64));
    g.sampling_mode(SamplingMode::Flat).sample_size(30);
    for (cname, codec) in CODECS {
        let mut i = 0usize;
        g.bench_function(cname.replace(':', "-"), |b| {
            b.iter(|| {
                let batch = batches[i % batches.len()];
                i += 1;
                work(*codec, batch)
            })
        });
    }
    g.finish();
}

fn write_report(report: &[CorpusReport]) {
    let corpora: Vec<String> = report
        .iter()
        .map(|r| {
            let codecs: Vec<String> = r
                .codecs
                .iter()
                .map(|s| {
                    format!(
                        "{{\"codec\":\"{}\",\"ratio\":{:.4},\"batches\":{},\"raw_batches\":{},\"raw_bytes\":{},\"payload_bytes\":{}}}",
                        s.codec,
                        s.ratio(),
                        s.batches,
                        s.raw_batches,
                        s.raw_bytes,
                        s.payload_bytes
                    )
                })
                .collect();
            format!(
                "{{\"corpus\":\"{}\",\"ram_bytes\":{},\"total_pages\":{},\"nonzero_pages\":{},\"batch_pages\":{},\"codecs\":[{}]}}",
                r.name,
                r.ram_bytes,
                r.total_pages,
                r.nonzero_pages,
                BATCH_BYTES / PAGE_SIZE,
                codecs.join(",")
            )
        })
        .collect();
    let dir = report_dir();
    let path = dir.join("codecs.json");
    let text = format!("{{\"corpora\":[{}]}}\n", corpora.join(","));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
        Ok(()) => eprintln!("codecs: ratios written to {}", path.display()),
        Err(e) => eprintln!("codecs: cannot write {}: {e}", path.display()),
    }
}
