#!/usr/bin/env bash
# Preflight's prediction against what happened, on the testbed's shaped links.
# For each profile and codec: a fresh 2-host testbed, a 512 MiB guest whose 256 MiB
# workload dirties 20 MiB/s on h1, `ferryctl migrate` to h2, then the predicted total time
# and downtime (from the migration's own preflight) beside the measured ones.
#
#   benches/predict-vs-actual.sh                  profiles "wan far", codecs "lz4 zstd"
#   PROFILES="wan" CODECS="none" benches/predict-vs-actual.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILES=${PROFILES:-"wan far"}
CODECS=${CODECS:-"lz4 zstd"}
DIRTY=${DIRTY_MIBPS:-20}
cargo build --release -p ferry-agent -p ferryctl -p ferry-linkem -p ferry-testkit >/dev/null
bash scripts/build-guest.sh >/dev/null
BIN=$ROOT/target/release
export FERRY_TB_PREFIX=fpva
DIR=/tmp/fpva-testbed
trap 'testbed/down.sh --dir "$DIR" --quiet >/dev/null 2>&1 || true' EXIT

echo "| link | codec | predicted total ms | actual total ms | error | predicted downtime ms | actual downtime ms | rounds (pred/actual) | link MiB/s (probe) |"
echo "|---|---|---|---|---|---|---|---|---|"
for profile in $PROFILES; do
  for codec in $CODECS; do
    testbed/down.sh --dir "$DIR" --quiet >/dev/null 2>&1 || true
    testbed/up.sh --hosts 2 --profile "$profile" --dir "$DIR" --ferryd "$BIN/ferryd" --ferryctl "$BIN/ferryctl" --linkem "$BIN/ferry-linkem" >/dev/null
    ctl() { ip netns exec fpva-h1 "$BIN/ferryctl" --agent 10.77.0.1:7701 --pki-dir "$DIR/pki" --identity operator "$@"; }
    cat > "$DIR/vm.toml" <<TOML
name = "pva"
memory_mib = 512
kernel = "$ROOT/build/guest/vmlinuz"
initrd = "$ROOT/build/guest/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet ferry.mem_mib=256 ferry.dirty_mibps=$DIRTY ferry.mix=realistic ferry.seed=1"
TOML
    ctl vm define "$DIR/vm.toml" >/dev/null
    ctl vm start pva >/dev/null
    log=$(ctl --json vm show pva | python3 -c "import json,sys; print(json.load(sys.stdin)['console_log'])")
    "$BIN/ferry-guest" wait-ready "$log" --timeout 120 >/dev/null
    sleep 3
    ctl --json migrate pva --to 10.77.0.2:7701 --compress "$codec" --force > "$DIR/run.jsonl" || true
    python3 - "$DIR/run.jsonl" "$profile" "$codec" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
m = lines[-1]
s = m.get("stats") or {}
p = s.get("prediction") or {}
if m.get("phase") != "COMPLETED":
    print(f"| {sys.argv[2]} | {sys.argv[3]} | failed: {m.get('error')} |||||||")
    sys.exit(0)
pt, at = p.get("predicted_total_ms", 0), s.get("elapsed_ms", 0)
err = f"{(pt - at) / at * 100:+.0f}%" if at else "-"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {pt} | {at} | {err} | {p.get('predicted_downtime_ms', 0)} | {s.get('downtime_ms', 0)} | "
      f"{p.get('predicted_rounds', 0)}/{s.get('rounds', 0)} | {p.get('link_bytes_per_sec', 0) / 2**20:.0f} |")
PY
    testbed/down.sh --dir "$DIR" --quiet >/dev/null 2>&1 || true
  done
done
