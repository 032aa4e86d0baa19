#!/usr/bin/python3
"""Goal 1's ratio measured in pairs: ferry's total against QEMU's in the same repetition.

    benches/paired-ratio.py FILE... [--ferry M[,M...]] [--qemu METHOD] [--dirty R]

compare.sh interleaves the methods inside each repetition, so a ferry run and the QEMU run
beside it share the hour's load (on these 2-core hosts the same migration's CPU moves by a
third between hours, both sides alike). Each pair's ratio is ferry's total over QEMU's;
with several ferry methods, the repetition's best of them (goal 1 asks for "ferry's best
total"). Prints every pair, then the pooled median with a bootstrap 90% interval of the
median (10,000 resamples, fixed seed): an interval wholly below a goal's ratio says it is
met on these runs, one that holds it says the runs cannot tell.
"""

import argparse
import json
import os
import random
import statistics


def pairs(path, ferry, qemu, dirty):
    data = json.load(open(path))
    runs = [r for r in data.get("runs", []) if r.get("ok") and r.get("dirty") == dirty]
    out = []
    for rep in sorted({r["rep"] for r in runs}):
        here = [r for r in runs if r["rep"] == rep]
        q = [r["total_ms"] for r in here if r["method"] == qemu]
        f = [r["total_ms"] for r in here if r["method"] in ferry]
        if q and f:
            out.append((rep, min(f), q[0]))
    return out


def median_interval(xs, n=10_000, level=0.90, seed=1):
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    lo = meds[int((1 - level) / 2 * n)]
    hi = meds[int((1 + level) / 2 * n) - 1]
    return lo, hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ferry", default="ferry-auto,ferry-zstd1,ferry-zstdf1",
                    help="ferry methods; a repetition's best of them counts")
    ap.add_argument("--qemu", default="qemu-multifd-zstd")
    ap.add_argument("--dirty", type=float, default=50)
    ap.add_argument("--goal", type=float, default=0.7)
    a = ap.parse_args()
    ferry = set(a.ferry.split(","))
    ratios = []
    for path in a.files:
        for rep, f, q in pairs(path, ferry, a.qemu, a.dirty):
            ratios.append(f / q)
            print(f"{os.path.basename(path)} rep {rep}: ferry {f} ms, QEMU {q} ms, {f / q:.2f}x")
    if not ratios:
        raise SystemExit("no pairs: no repetition ran both a ferry method and " + a.qemu)
    med = statistics.median(ratios)
    lo, hi = median_interval(ratios)
    verdict = ("met" if hi <= a.goal else "missed" if lo > a.goal else "not resolved")
    print(f"{len(ratios)} pairs: median {med:.2f}x, 90% interval of the median "
          f"{lo:.2f}-{hi:.2f}x; goal {a.goal}x: {verdict}")


if __name__ == "__main__":
    main()
