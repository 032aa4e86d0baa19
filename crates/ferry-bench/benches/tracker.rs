//! Cost of the dirty-page tracker's collection (`UffdTracker::collect`: one
//! `PAGEMAP_SCAN` over write-protected page tables), the step the source runs once per
//! pre-copy round and once inside the pause (project issue 11, goal 4).
//!
//! A RAM file in /dev/shm of each size, every page populated through this process's own
//! mapping (as a booted guest's RAM is in QEMU's), tracked with a userfaultfd of this
//! process. Per size and number of pages written between two collections (spread evenly,
//! one byte each): the median and spread over `FERRY_TRACKER_ITERS` (30) collections of
//! `collect()` (re-protects what it finds: a pre-copy round) and of `collect_final()`
//! (only reads: the pause). Needs Linux >= 6.7 (WP_ASYNC); says why and exits cleanly
//! otherwise.
//!
//! `cargo bench -p ferry-bench --bench tracker` (sizes in MiB: `FERRY_TRACKER_SIZES`,
//! default `1024,4096`). `FERRY_TRACKER_SPIN=1` keeps a second thread of this process
//! busy, as QEMU's vCPU thread is: re-protecting must then flush that core's TLB too.

use ferry_memory::{DirtyTracker, RamFile, UffdTracker, PAGE_SIZE};
use std::time::{Duration, Instant};

fn main() {
    let sizes: Vec<u64> = std::env::var("FERRY_TRACKER_SIZES")
        .unwrap_or_else(|_| "1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let iters: usize = std::env::var("FERRY_TRACKER_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    // Another thread of this process busy on the other core, as QEMU's threads are: the
    // collection's TLB flush must then reach that core too.
    if std::env::var("FERRY_TRACKER_SPIN").is_ok() {
        std::thread::spawn(|| loop {
            std::hint::black_box(0u64);
        });
    }
    println!("| guest MiB | pages written between collections | call | median ms | min / max ms |");
    println!("|---|---|---|---|---|");
    for mib in sizes {
        if let Err(e) = one_size(mib, iters) {
            eprintln!("tracker: {mib} MiB: {e}; nothing measured");
            return;
        }
    }
}

fn one_size(mib: u64, iters: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in("/dev/shm")?;
    let ram = RamFile::create(dir.path().join("ram"), mib << 20)?;
    let pages = ram.page_count();
    let base = ram.mapping_addr() as *mut u8;
    let touch = |p: u64, v: u8| {
        // SAFETY: p < pages, so the byte lies inside the live, writable mapping.
        unsafe { base.add((p as usize) * PAGE_SIZE).write_volatile(v) }
    };
    for p in 0..pages {
        touch(p, 1);
    }
    let mut t = UffdTracker::attach_self(ram.mapping_addr(), ram.len() as usize, 0)?;
    t.arm()?;
    for written in [0u64, 500, 5000] {
        for last in [false, true] {
            let mut times = Vec::with_capacity(iters);
            for i in 0..iters {
                if let Some(stride) = pages.checked_div(written) {
                    for k in 0..written {
                        touch((k * stride + i as u64) % pages, i as u8);
                    }
                }
                let t0 = Instant::now();
                let got = if last {
                    t.collect_final()?
                } else {
                    t.collect()?
                };
                times.push(t0.elapsed());
                if last {
                    t.arm()?;
                }
                if got.count() != written {
                    return Err(format!("collected {} pages, wrote {written}", got.count()).into());
                }
            }
            times.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "| {mib} | {written} | {} | {:.2} | {:.2} / {:.2} |",
                if last { "collect_final" } else { "collect" },
                ms(times[times.len() / 2]),
                ms(times[0]),
                ms(times[times.len() - 1])
            );
        }
    }
    Ok(())
}
