#!/usr/bin/env bash
# The main job, end to end on this machine: installs what is missing, builds ferry and
# the test guest, starts two agents (hosts "a" and "b": separate ports, state and RAM
# directories), boots a guest with ferry's workload on "a", and live-migrates it while it
# dirties memory: a -> b (no compression), b -> a (lz4), a -> b (zstd). After every move it
# proves the guest kept running with its memory intact (the workload re-checks every
# page it ever wrote), and at the end prints a table of the reports.
#
#   scripts/demo.sh                       defaults: 512 MiB VM, 256 MiB workload, 20 MiB/s
#   DEMO_DIRTY_MIBPS=50 scripts/demo.sh   another dirty rate
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VM_MIB=${DEMO_VM_MIB:-512}
WORK_MIB=${DEMO_WORK_MIB:-256}
DIRTY=${DEMO_DIRTY_MIBPS:-20}
CODECS=${DEMO_CODECS:-"none lz4 zstd"}

command -v qemu-system-x86_64 >/dev/null && command -v busybox >/dev/null || bash scripts/install-deps.sh
bash scripts/build-guest.sh
cargo build --release -p ferry-agent -p ferryctl -p ferry-testkit
BIN=$ROOT/target/release

DEMO=$ROOT/build/demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
RAM_BASE=/dev/shm/ferry-demo
rm -rf "$RAM_BASE"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # QEMUs the agents started (their command lines name the demo directory).
  pkill -f "$DEMO/" 2>/dev/null || true
  rm -rf "$RAM_BASE"
}
trap cleanup EXIT

"$BIN/ferryctl" certs init --dir "$DEMO/pki" --host a --host b --operator operator >/dev/null

declare -A GRPC=([a]=127.0.0.1:7701 [b]=127.0.0.1:7702)
declare -A QUIC=([a]=127.0.0.1:7711 [b]=127.0.0.1:7712)
for h in a b; do
  mkdir -p "$DEMO/$h"
  cat > "$DEMO/$h/ferryd.toml" <<TOML
host_name = "$h"
grpc_listen = "${GRPC[$h]}"
quic_listen = "${QUIC[$h]}"
ram_dir = "$RAM_BASE/$h"
state_dir = "$DEMO/$h/state"
accel = "tcg"            # /dev/kvm here cannot boot a guest; production uses kvm
boot_roots = ["$ROOT/build/guest"]   # direct-boot kernels only from here
[tls]
ca = "$DEMO/pki/ca.pem"
cert = "$DEMO/pki/$h.pem"
key = "$DEMO/pki/$h.key"
TOML
  "$BIN/ferryd" --config "$DEMO/$h/ferryd.toml" >"$DEMO/$h/ferryd.log" 2>&1 &
  pids+=($!)
done

export FERRY_PKI_DIR=$DEMO/pki FERRY_IDENTITY=operator
ctl() { local host=$1; shift; "$BIN/ferryctl" --agent "${GRPC[$host]}" "$@"; }
for h in a b; do
  for _ in $(seq 50); do ctl "$h" vm list >/dev/null 2>&1 && break; sleep 0.2; done
  ctl "$h" vm list >/dev/null
done
echo "== two agents up: a=${GRPC[a]} b=${GRPC[b]}"

cat > "$DEMO/web01.toml" <<TOML
name = "web01"
vcpus = 1
memory_mib = $VM_MIB
kernel = "$ROOT/build/guest/vmlinuz"
initrd = "$ROOT/build/guest/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet ferry.mem_mib=$WORK_MIB ferry.dirty_mibps=$DIRTY ferry.mix=realistic ferry.seed=1"
TOML
ctl a vm define "$DEMO/web01.toml" >/dev/null
ctl a vm start web01 >/dev/null
field() { ctl "$1" --json vm show web01 | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"; }
"$BIN/ferry-guest" wait-ready "$(field a console_log)" --timeout 120
echo "== web01 running on a: workload of $WORK_MIB MiB dirtying $DIRTY MiB/s"
sleep 3

from=a; to=b
results=()
for codec in $CODECS; do
  sock=$(field $from console_socket)
  before=$("$BIN/ferry-guest" cmd "$sock" ping --expect FERRY-PONG)
  echo
  echo "== live-migrating web01 $from -> $to with --compress $codec (guest: $before)"
  ctl $from migrate web01 --to "${GRPC[$to]}" --compress "$codec"
  ctl $from --json migrations list > "$DEMO/migrations-$codec.json"
  sock=$(field $to console_socket)
  check=$("$BIN/ferry-guest" cmd "$sock" check --expect FERRY-CHECK --timeout 120)
  after=$("$BIN/ferry-guest" cmd "$sock" ping --expect FERRY-PONG)
  echo "== web01 on $to: $check; $after (was $before on $from)"
  results+=("$codec $from $to")
  t=$from; from=$to; to=$t
done

echo
echo "== summary (from the agents' reports)"
python3 - "$DEMO" $CODECS <<'PY'
import json, sys
demo, codecs = sys.argv[1], sys.argv[2:]
print(f"| codec | total ms | downtime ms | rounds | guest RAM MiB | pages sent | wire MiB | ratio | verified |")
print(f"|---|---|---|---|---|---|---|---|---|")
for c in codecs:
    ms = json.load(open(f"{demo}/migrations-{c}.json"))
    ms = ms.get("migrations", ms) if isinstance(ms, dict) else ms
    m = ms[0]
    s = m.get("stats", {})
    g = lambda k: s.get(k, 0) or 0
    print(f"| {c} | {g('elapsed_ms')} | {g('downtime_ms')} | {g('rounds')} | {g('guest_ram_bytes')/2**20:.0f} | {g('pages_sent')} | "
          f"{g('wire_bytes')/2**20:.1f} | {g('compression_ratio'):.2f} | {'yes' if s.get('ram_digest') else 'no'} |")
PY
ctl "$from" vm stop web01 --force >/dev/null
echo "== done: the guest moved ${#results[@]} times and passed its memory check after each move"
