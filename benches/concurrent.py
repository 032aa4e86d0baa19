#!/usr/bin/python3
"""Several live migrations at once between the two hosts of a testbed: how long until all
of them are done, and the agents' CPU for them (the data plane's one thread per agent is
shared by every migration: ARCHITECTURE.md, "The data plane's thread").

    benches/concurrent.py --testbed-env ENV --bin DIR --root REPO --out DIR
        [--vms 2] [--guest-mib 512] [--workload-mib 256] [--dirty 20] [--repeat 2]
        [--compress zstd:-1]

Each repetition defines and boots --vms guests on host 1, starts all their migrations to
host 2 at the same moment (one `ferryctl migrate` each, in parallel), then checks every
guest's memory on host 2 (`check` on its console) and removes them. Run by
`benches/concurrent.sh`, which brings the testbed up and down.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed-env", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vms", type=int, default=2)
    ap.add_argument("--guest-mib", type=int, default=512)
    ap.add_argument("--workload-mib", type=int, default=256)
    ap.add_argument("--mix", default="realistic")
    ap.add_argument("--dirty", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--compress", default="zstd:-1")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tb = harness.Testbed(args.testbed_env, args.bin, args.root)
    workdir = os.path.join(args.out, "specs")
    os.makedirs(workdir, exist_ok=True)
    runs = []
    for rep in range(args.repeat):
        names = [f"c{rep + 1}v{i + 1}" for i in range(args.vms)]
        rec = {"rep": rep + 1, "vms": args.vms, "ok": False, "error": "", "migrations": []}
        try:
            for name in names:
                spec = os.path.join(workdir, f"{name}.toml")
                with open(spec, "w") as f:
                    f.write(harness.vm_spec_toml(name, args, tb.root).replace("{dirty}", str(args.dirty)))
                tb.ctl(0, "vm", "define", spec)
                tb.ctl_json(0, "vm", "start", name)
            for name in names:
                info = tb.ctl_json(0, "vm", "show", name)
                tb.guest("wait-ready", info["console_log"], "--timeout", "300", timeout=300)
            time.sleep(3.0)
            cpu0 = [harness.proc_cpu(p) for p in tb.ferryd]
            results = {}

            def migrate(name):
                t = time.time()
                r = tb.ctl(0, "--json", "migrate", name, "--to", tb.grpc[1], "--compress", args.compress,
                           "--force", timeout=600, check=False)
                lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip().startswith("{")]
                results[name] = (time.time() - t, lines[-1] if lines else {"error": r.stderr[-400:]})

            harness.log(f"repetition {rep + 1}: {args.vms} migrations at once")
            t0 = time.time()
            threads = [threading.Thread(target=migrate, args=(n,)) for n in names]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            all_s = time.time() - t0
            cpu1 = [harness.proc_cpu(p) for p in tb.ferryd]
            for name in names:
                secs, st = results[name]
                if st.get("phase") != "COMPLETED":
                    raise harness.RunFailed(f"{name}: {st.get('phase')}: {st.get('error')}")
                target = tb.ctl_json(1, "vm", "show", name)
                check = harness.guest_check(tb, target["console_socket"])
                s = st.get("stats") or {}
                bd = s.get("downtime_breakdown") or {}
                rec["migrations"].append({
                    "vm": name, "total_ms": st["finished_unix_ms"] - st["started_unix_ms"],
                    "downtime_ms": s.get("downtime_ms"), "pause_to_ready_ms": bd.get("commit_us", 0) / 1000,
                    "wire_bytes": s.get("wire_bytes"), "rounds": s.get("rounds"), "guest_check": check})
            rec.update({"ok": True, "all_done_ms": round(all_s * 1000),
                        "cpu_agents_s": sum(b - a for a, b in zip(cpu0, cpu1)),
                        "cpu_source_agent_s": cpu1[0] - cpu0[0], "cpu_target_agent_s": cpu1[1] - cpu0[1]})
            harness.log(f"  all done in {rec['all_done_ms']} ms; each "
                        f"{[m['total_ms'] for m in rec['migrations']]} ms, pauses "
                        f"{[m['downtime_ms'] for m in rec['migrations']]} ms; agents {rec['cpu_agents_s']:.2f} CPU-s")
        except (harness.RunFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
            rec["error"] = str(e)
            harness.log(f"  FAILED: {e}")
        finally:
            for name in names:
                for host in (1, 0):
                    tb.ctl(host, "vm", "stop", name, "--force", check=False, timeout=60)
                    tb.ctl(host, "vm", "undefine", name, check=False, timeout=60)
        runs.append(rec)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    if not all(r["ok"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
