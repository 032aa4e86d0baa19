#!/usr/bin/python3
"""Replays recorded benchmark sets through other learners of the pause's measured parts
(issue 11, goal 6): would a different average of the device-state save and of the commit
tail have put more pauses within 20% of what happened?

    benches/pause-learner-replay.py benches/results/SET.json [...]

Each results file is one agent pair's life: its ferry runs in order, each one's prediction
made with what the runs before it measured. Lossless paths only (a lossy one's tail is not
learned). For every run the recorded prediction is taken apart (2 ms of steps + the larger
of the save and the final round's transfer + the tail) and put together again with the
save and tail another learner would have given; printed: pauses within 20% per pair of
learners (save, tail), the recorded prediction's count beside it.
"""

import json
import statistics
import sys


def ewma(hist):
    """ferryd's own: half weight to the newest (`learn_device_save`)."""
    v = 0.0
    for m in hist:
        m = min(max(m, 1.0), 1000.0)
        v = m if v <= 0 else 0.5 * v + 0.5 * m
    return v


def median_of(k):
    def f(hist):
        h = [min(max(m, 1.0), 1000.0) for m in hist[-k:]]
        return statistics.median(h) if h else 0.0
    return f


def least_of(k):
    def f(hist):
        return min(hist[-k:]) if hist else 0.0
    return f


LEARNERS = {"ewma": ewma, "med3": median_of(3), "med5": median_of(5), "med7": median_of(7),
            "min3": least_of(3)}


def main(paths):
    results = {}
    for sname, save_l in LEARNERS.items():
        for tname, tail_l in LEARNERS.items():
            total = within = recorded = 0
            for path in paths:
                saves, tails = [], []
                for r in json.load(open(path))["runs"]:
                    if not r.get("method", "").startswith("ferry") or not r.get("ok", True):
                        continue
                    p = r.get("prediction") or {}
                    b = r.get("downtime_breakdown_us") or {}
                    if p.get("loss_rate", 0) > 0 or not p.get("predicted_downtime_ms"):
                        continue
                    pd, save_used, tail_used = (p["predicted_downtime_ms"], p["device_save_ms"],
                                                p["commit_tail_ms"])
                    model_tail = p["rtt_ms"] / 2 + 5  # half a round trip, load, resume
                    tail_used = tail_used if tail_used > 0 else model_tail
                    rest = pd + 0.5 - 2 - tail_used
                    final_round = rest if rest > save_used + 1.0 else 0.0
                    save = save_l(saves) if saves else 12.0
                    tail = tail_l(tails) if tails else model_tail
                    new = int(2 + max(save, final_round) + tail)
                    actual = r["downtime_ms"]
                    total += 1
                    within += abs(new - actual) / actual <= 0.2
                    recorded += abs(pd - actual) / actual <= 0.2
                    if b.get("fence_us", 0) > 0:
                        saves.append(b["fence_us"] / 1000)
                    if b.get("commit_sent_us", 0) > 0 and b.get("commit_us", 0) > b["commit_sent_us"]:
                        tails.append((b["commit_us"] - b["commit_sent_us"]) / 1000)
            results[(sname, tname)] = (within, total, recorded)
    for (s, t), (w, n, rec) in sorted(results.items(), key=lambda kv: -kv[1][0]):
        print(f"save {s:5} tail {t:5}: {w} of {n} pauses within 20% (recorded: {rec})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
