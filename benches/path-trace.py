#!/usr/bin/python3
"""The data plane's path per time slice, from a source agent's log.

    RUST_LOG=info,ferry_agent::migration::path_trace=debug benches/compare.sh ...
    benches/path-trace.py /tmp/fbench-testbed/h1/ferryd.log [slice_ms, default 1000]

Reads the `path` lines `migration::path_trace` logs every 10 ms (congestion window, RTT,
bytes sent, packets lost, congestion events) and prints, per slice: the rate sent, packets
lost, congestion events quinn counted (before ferry's filter decides), and the window's
and RTT's range; each migration in the log apart.
"""

import collections
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELDS = ["t_ms", "cwnd_kb", "rtt_us", "min_rtt_us", "sent_kb", "lost", "events"]


def main():
    path = sys.argv[1]
    slice_ms = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    rows = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            if "path_trace" not in line:
                continue
            d = dict(re.findall(r"(\w+)=(\S+)", ANSI.sub("", line)))
            try:
                rows[d.get("migration", "?")].append({k: int(d[k]) for k in FIELDS})
            except (KeyError, ValueError):
                continue
    for migration, samples in rows.items():
        print(f"migration {migration}: {len(samples)} samples")
        report(samples, slice_ms)


def report(rows, slice_ms):
    b = collections.defaultdict(lambda: [0, 0, 0, [], []])
    for r in rows:
        s = b[r["t_ms"] // slice_ms]
        s[0] += r["sent_kb"]
        s[1] += r["lost"]
        s[2] += r["events"]
        s[3].append(r["cwnd_kb"])
        s[4].append(r["rtt_us"] // 1000)
    total = 0
    for k in sorted(b):
        sent, lost, ev, cw, rtt = b[k]
        total += sent
        print(f"{k * slice_ms / 1000:5.1f}s  {sent * 8 / slice_ms:6.1f} Mbit/s lost {lost:4d} "
              f"events {ev:3d} cwnd {min(cw)}-{max(cw)} kB rtt {min(rtt)}-{max(rtt)} ms")
    print(f"total {total / 1000:.1f} MB")


if __name__ == "__main__":
    main()
