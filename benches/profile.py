#!/usr/bin/python3
"""Where ferry's agents spend their CPU during a migration, from a `perf record` of both.

    benches/profile.py PERF.data --source-pid N --target-pid M --page-bytes B --freq HZ --out DIR [--name NAME]
    benches/profile.py NAME.folded ... (the tables again from collapsed stacks)

Writes DIR/NAME.folded (collapsed stacks, one per agent: the root frame is `source` or
`target`), DIR/NAME.svg (the flame graph, inferno), and DIR/NAME-stages.md: CPU seconds
per stage and per GiB of guest pages moved, each agent apart. A sample is charged to the
first stage whose pattern matches a frame of its stack, innermost frame first, so that
e.g. a memcpy inside the compressor counts as compression.

Needs `perf` (linux-perf) and `inferno-collapse-perf` / `inferno-flamegraph`
(`cargo install inferno`).
"""

import argparse
import collections
import os
import re
import subprocess
import sys

# (stage, regex over one frame). Order matters only between stages that share frames.
STAGES = [
    # Decompression first: its names contain "compress" too.
    ("decompress", r"lz4_flex::block::decompress|lz4_flex::.*decompress|ZSTD_decompress|ZSTD_d|zstd::.*decompress"),
    ("compress (lz4/zstd)", r"lz4_flex::block::compress|lz4_flex::.*compress|ZSTD_compress|zstd::.*compress|ZSTD_c"),
    ("page sums (XXH3)", r"xxhash|XxHash3|twox_hash|page_sum|PageSums"),
    ("zero check", r"is_zero_page|is_zero_raw"),
    ("frame CRC", r"crc32fast|crc32"),
    ("encrypt/decrypt (TLS/QUIC AEAD)", r"aes_gcm|aes_hw|aesni|gcm_|GFp_|ring::aead|aws_lc|chacha|poly1305|rustls::.*(encrypt|decrypt)|quinn_proto::crypto|header_protection|seal|open_in_place"),
    ("UDP send", r"sendmsg|sendmmsg|udp_send|__sys_sendmsg|quinn_udp::.*send|ip_finish_output|dev_queue_xmit"),
    ("UDP receive", r"recvmsg|recvmmsg|udp_recv|__sys_recvmsg|quinn_udp::.*recv|ip_rcv|udp_rcv"),
    ("QUIC protocol (quinn)", r"quinn_proto::|quinn::"),
    ("read guest RAM / copy", r"read_page|read_pages|RamFile::.*read|encode_chunk"),
    ("write guest RAM", r"write_pages|write_page|zero_page|apply_frame|store_pages|pwrite|write_all_at"),
    ("memcpy / memmove", r"memcpy|memmove|__memcpy|copy_user|rep_movs"),
    ("page faults / memory mgmt", r"page_fault|handle_mm_fault|do_anonymous_page|clear_page|shmem_fault|alloc_pages|__alloc|mmap|munmap|madvise|free_pages"),
    ("tracker (uffd/pagemap)", r"pagemap|userfaultfd|uffd|PAGEMAP_SCAN"),
    ("async runtime / scheduling", r"tokio::|schedule|futex|epoll|__schedule|park|mio::"),
    ("allocator", r"malloc|free|realloc|jemalloc|__libc_"),
]
COMPILED = [(name, re.compile(rx)) for name, rx in STAGES]


def collapse(perf_data, pids):
    """Collapsed stacks with the agent's role as root frame."""
    script = subprocess.run(["perf", "script", "-F", "comm,pid,tid,time,event,ip,sym,dso", "-i", perf_data],
                            capture_output=True, check=True).stdout
    folded = subprocess.run(["inferno-collapse-perf", "--pid", "--all"], input=script,
                            capture_output=True, check=True).stdout.decode(errors="replace")
    out = []
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        first, _, rest = stack.partition(";")
        # inferno's --pid root frame: "comm-PID/TID" or "comm-PID"
        m = re.search(r"-(\d+)(/\d+)?$", first)
        role = pids.get(int(m.group(1))) if m else None
        if role is None:
            continue
        out.append(f"{role};{rest} {count}" if rest else f"{role} {count}")
    return out


def stages(folded):
    per = collections.defaultdict(lambda: collections.Counter())
    totals = collections.Counter()
    for line in folded:
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        role = frames[0]
        totals[role] += n
        hit = "other"
        for f in reversed(frames[1:]):
            for name, rx in COMPILED:
                if rx.search(f):
                    hit = name
                    break
            if hit != "other":
                break
        per[role][hit] += n
    return per, totals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("perf_data")
    ap.add_argument("--source-pid", type=int, required=True)
    ap.add_argument("--target-pid", type=int, required=True)
    ap.add_argument("--page-bytes", type=float, required=True, help="guest page bytes the migration moved")
    ap.add_argument("--freq", type=float, required=True, help="perf record sampling frequency, Hz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="profile")
    ap.add_argument("--title", default="ferry agents during a migration")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    fpath = os.path.join(a.out, f"{a.name}.folded")
    if a.perf_data.endswith(".folded"):
        # Tables again from stacks already collapsed (no perf needed).
        folded = [l.rstrip("\n") for l in open(a.perf_data) if l.strip()]
    else:
        folded = collapse(a.perf_data, {a.source_pid: "source", a.target_pid: "target"})
        with open(fpath, "w") as f:
            f.write("\n".join(folded) + "\n")
        with open(os.path.join(a.out, f"{a.name}.svg"), "w") as f:
            subprocess.run(["inferno-flamegraph", "--title", a.title, "--width", "1600", fpath], stdout=f, check=True)
    per, totals = stages(folded)
    gib = a.page_bytes / 2**30
    rows = ["| stage | source CPU s | source s/GiB | target CPU s | target s/GiB |", "|---|---|---|---|---|"]
    names = [n for n, _ in STAGES] + ["other"]
    for n in sorted(names, key=lambda n: -(per["source"][n] + per["target"][n])):
        s, t = per["source"][n] / a.freq, per["target"][n] / a.freq
        if s == 0 and t == 0:
            continue
        rows.append(f"| {n} | {s:.3f} | {s / gib:.3f} | {t:.3f} | {t / gib:.3f} |")
    s, t = totals["source"] / a.freq, totals["target"] / a.freq
    rows.append(f"| **all** | **{s:.3f}** | **{s / gib:.3f}** | **{t:.3f}** | **{t / gib:.3f}** |")
    table = "\n".join(rows) + "\n"
    with open(os.path.join(a.out, f"{a.name}-stages.md"), "w") as f:
        f.write(f"Guest pages moved: {a.page_bytes / 2**20:.0f} MiB; {a.freq:g} Hz sampling.\n\n" + table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
