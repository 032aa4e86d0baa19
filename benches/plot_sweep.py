#!/usr/bin/python3
"""Downtime and total time against guest RAM size, from a benches/sweep.sh run.

    benches/plot_sweep.py OUT --sizes 1024,2048,4096

Reads OUT/<size>/results.json, writes OUT/sweep.png and OUT/sweep.md (medians per method
and size, and each method's 4 GiB / 1 GiB downtime ratio).
"""

import argparse
import json
import os
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sizes", required=True)
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]
    med = {}  # (method, size) -> (total, downtime, n)
    methods = []
    for size in sizes:
        path = os.path.join(a.out, str(size), "results.json")
        if not os.path.exists(path):
            continue
        runs = json.load(open(path))["runs"]
        for m in dict.fromkeys(r["method"] for r in runs):
            ok = [r for r in runs if r["method"] == m and r["ok"]]
            if m not in methods:
                methods.append(m)
            if ok:
                med[(m, size)] = (statistics.median(r["total_ms"] for r in ok),
                                  statistics.median(r["downtime_ms"] for r in ok), len(ok))
    rows = ["| method | " + " | ".join(f"{s} MiB total / downtime ms" for s in sizes) + " | downtime largest / smallest |",
            "|---|" + "---|" * (len(sizes) + 1)]
    for m in methods:
        cells = []
        for s in sizes:
            v = med.get((m, s))
            cells.append(f"{v[0]:.0f} / {v[1]:.1f} (n={v[2]})" if v else "–")
        lo, hi = med.get((m, sizes[0])), med.get((m, sizes[-1]))
        ratio = f"{hi[1] / lo[1]:.2f}" if lo and hi and lo[1] > 0 else "–"
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(rows) + "\n"
    with open(os.path.join(a.out, "sweep.md"), "w") as f:
        f.write(table)
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        xs = [s for s in sizes if (m, s) in med]
        axes[0].plot([x / 1024 for x in xs], [med[(m, s)][1] for s in xs], marker="o", label=m)
        axes[1].plot([x / 1024 for x in xs], [med[(m, s)][0] / 1000 for s in xs], marker="o", label=m)
    axes[0].set_title("downtime (ms, median)")
    axes[1].set_title("total time (s, median)")
    for ax in axes:
        ax.set_xlabel("guest RAM (GiB), same 512 MiB workload")
        ax.set_xticks([s / 1024 for s in sizes])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "sweep.png"), dpi=110)


if __name__ == "__main__":
    main()
