#!/usr/bin/env python3
"""Time from the start of a migration's preflight to its round 0, from source agents' logs.

Usage: benches/first-page.py 'benches/out/<set>-*/h1-ferryd.log' [more globs...]

For each glob (one build's logs, as compare.sh's callers save them beside results.json),
prints medians [min-max] over its migrations of:
- preflight -> round 0: "preflight checks against" to "copying guest memory (round 0",
- Prepare call: "asking ... to prepare" to "connecting data plane" (the call and its
  round trip),
- scan waited: how long round 0 then waited for the scan of non-zero pages (the "waited"
  field of "round 0: non-zero pages found"),
- first page: the two added up per migration (round 0's first page leaves after both).
"""
import glob
import re
import statistics as st
import sys
from datetime import datetime

ANSI = re.compile(r"\x1b\[[0-9;]*m")
UNITS = {"ns": 1e-6, "µs": 1e-3, "ms": 1.0, "s": 1e3}


def ts(line):
    return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f")


def ms(a, b):
    return (b - a).total_seconds() * 1e3


def summary(xs):
    if not xs:
        return "-"
    return "%.0f [%.0f-%.0f] n=%d" % (st.median(xs), min(xs), max(xs), len(xs))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for pattern in sys.argv[1:]:
        first, prepare, waited, page = [], [], [], []
        for path in sorted(glob.glob(pattern)):
            seen = {}
            for line in open(path, errors="replace"):
                line = ANSI.sub("", line)
                m = re.search(r"migration=([0-9a-f-]+)", line)
                if not m:
                    continue
                mid = m.group(1)
                if "preflight checks against" in line:
                    seen[mid] = {"preflight": ts(line)}
                elif mid not in seen:
                    continue
                elif "to prepare" in line and "asking" in line:
                    seen[mid]["ask"] = ts(line)
                elif "connecting data plane" in line:
                    seen[mid]["connect"] = ts(line)
                elif "copying guest memory (round 0" in line:
                    s = seen[mid]
                    s["round0"] = ms(s["preflight"], ts(line))
                    first.append(s["round0"])
                    if "ask" in s and "connect" in s:
                        prepare.append(ms(s["ask"], s["connect"]))
                elif "non-zero pages found" in line:
                    w = re.search(r"waited=([0-9.]+)(ns|µs|ms|s)\b", line)
                    if w and "round0" in seen[mid]:
                        waited.append(float(w.group(1)) * UNITS[w.group(2)])
                        page.append(seen[mid]["round0"] + waited[-1])
        print(f"{pattern}: preflight -> round 0 {summary(first)}; "
              f"Prepare call {summary(prepare)}; scan waited {summary(waited)}; "
              f"first page {summary(page)}")


if __name__ == "__main__":
    main()
