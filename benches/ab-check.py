#!/usr/bin/python3
"""Two builds' interleaved benchmark sets side by side (issue 11's A/B comparisons).

    benches/ab-check.py 'A-glob' 'B-glob' [--ratio METHOD_X/METHOD_Y]

Each glob names the results.json files of one build (e.g. 'benches/results/abauto-s20-*.json').
For every method both builds ran: n, median total time, pause and agents' CPU per build, and
a two-sided Mann-Whitney U test (normal approximation, ties averaged) of B against A on the
total time and the pause. With --ratio, the median total of METHOD_X over METHOD_Y per build
(e.g. ferry-auto/ferry-zstd1) and the same test of X against Y within each build.
"""

import glob
import json
import math
import statistics
import sys


def runs(pattern):
    out = {}
    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"no files match {pattern}")
    for path in files:
        data = json.load(open(path))
        for r in data["runs"] if isinstance(data, dict) else data:
            if r.get("ok", True):
                out.setdefault(r["method"], []).append(r)
    return out


def mann_whitney_p(a, b):
    """Two-sided p of a Mann-Whitney U test, normal approximation."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return float("nan")
    pooled = sorted([(x, 0) for x in a] + [(x, 1) for x in b])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        for k in range(i, j):
            ranks[k] = (i + j + 1) / 2
        i = j
    r1 = sum(r for r, (_, g) in zip(ranks, pooled) if g == 0)
    u = r1 - n1 * (n1 + 1) / 2
    sd = math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    return math.erfc(abs(u - n1 * n2 / 2) / sd / math.sqrt(2)) if sd else 1.0


def col(rs, key):
    return [r[key] for r in rs]


def main(argv):
    ratio = None
    if "--ratio" in argv:
        i = argv.index("--ratio")
        ratio = argv[i + 1].split("/")
        argv = argv[:i] + argv[i + 2 :]
    if len(argv) != 2:
        sys.exit(__doc__)
    a, b = runs(argv[0]), runs(argv[1])
    print("| method | build | n | total ms median [min-max] | pause ms median [min-max] | agents CPU s | p (B vs A): total, pause |")
    print("|---|---|---|---|---|---|---|")
    for m in sorted(set(a) & set(b)):
        for name, d in (("A", a), ("B", b)):
            t, p, c = col(d[m], "total_ms"), col(d[m], "downtime_ms"), col(d[m], "cpu_agents_s")
            test = ""
            if name == "B":
                test = (f"{mann_whitney_p(col(b[m], 'total_ms'), col(a[m], 'total_ms')):.3f}, "
                        f"{mann_whitney_p(col(b[m], 'downtime_ms'), col(a[m], 'downtime_ms')):.3f}")
            print(f"| {m} | {name} | {len(t)} | {statistics.median(t):.0f} [{min(t)}-{max(t)}] | "
                  f"{statistics.median(p):.1f} [{min(p):.1f}-{max(p):.1f}] | {statistics.median(c):.2f} | {test} |")
    if ratio:
        x, y = ratio
        for name, d in (("A", a), ("B", b)):
            if x in d and y in d:
                tx, ty = col(d[x], "total_ms"), col(d[y], "total_ms")
                print(f"{name}: {x}/{y} median total {statistics.median(tx) / statistics.median(ty):.3f} "
                      f"(p {mann_whitney_p(tx, ty):.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
