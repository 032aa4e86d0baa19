#!/usr/bin/python3
"""How far the prediction ferry makes after round 0 was from what happened (issue 11, goal 6).

    benches/prediction-check.py OUT/results.json [...]

For every ferry run in the harness's results: predicted against actual migrate time and
pause, the error in percent, and how many fall within 20%.
"""

import json
import sys


def main(paths):
    runs = within_total = within_pause = 0
    for path in paths:
        for r in json.load(open(path))["runs"]:
            if not r.get("method", "").startswith("ferry") or not r.get("ok", True):
                continue
            p = r.get("prediction") or {}
            pt, pd = p.get("predicted_total_ms"), p.get("predicted_downtime_ms")
            at, ad = r.get("migrate_ms") or r["total_ms"], r["downtime_ms"]
            et = (pt - at) / at * 100 if pt else None
            ed = (pd - ad) / ad * 100 if pd else None
            runs += 1
            within_total += et is not None and abs(et) <= 20
            within_pause += ed is not None and abs(ed) <= 20
            fmt = lambda e: "–" if e is None else f"{e:+.0f}%"
            print(f"{path}\t{r['method']}\ttotal {at} ms, predicted {pt} ({fmt(et)})\t"
                  f"pause {ad:.1f} ms, predicted {pd} ({fmt(ed)})")
    print(f"totals within 20%: {within_total} of {runs}; pauses within 20%: {within_pause} of {runs}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
