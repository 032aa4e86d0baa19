#!/usr/bin/env bash
# Captures the RAM of the ferry test guest as a corpus for the codec micro-benchmarks
# (crates/ferry-bench, `cargo bench -p ferry-bench --bench codecs`).
#
#   scripts/capture-guest-ram.sh [--mix M[,M...]] [--vm-mib N] [--mem-mib N] [--rate R]
#                                [--dirty-secs S] [--seed S] [--timeout S] [OUT_DIR]
#
# For each mix: boots build/guest (built with scripts/build-guest.sh if missing) under
# QEMU (-accel tcg, RAM a memory-backend-file in /dev/shm with share=on, as ferryd runs
# guests), waits for FERRY-READY, lets the workload dirty memory for --dirty-secs, pauses
# the VM (QMP stop), copies the RAM file sparsely to OUT_DIR/guest-ram-<mix>.bin (with
# OUT_DIR/guest-ram-<mix>.txt describing it), quits QEMU and removes its files.
#
#   --mix M         realistic (default), text, random, zero: the workload's page mix,
#                   --mem-mib MiB of it dirtied at --rate MiB/s;
#                   idle: a guest that only booted (workload of 8 MiB, dirty rate 0).
#                   Several at once: --mix realistic,idle
#   --vm-mib N      guest RAM (default 512)
#   --mem-mib N     workload region for the non-idle mixes (default 256)
#   --rate R        dirty rate in MiB/s for the non-idle mixes (default 20)
#   --dirty-secs S  how long to let it run after FERRY-READY (default 3)
#   --seed S        workload content seed (default 1)
#   --timeout S     seconds to wait for FERRY-READY (default 300)
#   OUT_DIR         default build/corpus (build/ is not committed)
set -euo pipefail

MIXES=realistic
VM_MIB=512
MEM_MIB=256
RATE=20
DIRTY_SECS=3
SEED=1
READY_TIMEOUT=300
OUT=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --mix) MIXES=${2:?}; shift 2 ;;
    --vm-mib) VM_MIB=${2:?}; shift 2 ;;
    --mem-mib) MEM_MIB=${2:?}; shift 2 ;;
    --rate) RATE=${2:?}; shift 2 ;;
    --dirty-secs) DIRTY_SECS=${2:?}; shift 2 ;;
    --seed) SEED=${2:?}; shift 2 ;;
    --timeout) READY_TIMEOUT=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "capture-guest-ram: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || { echo "capture-guest-ram: one OUT_DIR only" >&2; usage; }
       OUT=$1; shift ;;
  esac
done

die() { echo "capture-guest-ram: error: $*" >&2; exit 1; }
log() { echo "capture-guest-ram: $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/build/corpus}
KERNEL=$ROOT/build/guest/vmlinuz
INITRD=$ROOT/build/guest/initramfs.cpio.gz

[[ "$VM_MIB" =~ ^[0-9]+$ ]] && [ "$VM_MIB" -ge 64 ] || die "--vm-mib must be a number >= 64"
[[ "$MEM_MIB" =~ ^[0-9]+$ ]] && [ "$MEM_MIB" -ge 1 ] && [ "$MEM_MIB" -lt "$VM_MIB" ] \
  || die "--mem-mib must be a number between 1 and --vm-mib"
[[ "$DIRTY_SECS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--dirty-secs must be a number"
IFS=, read -r -a MIX_LIST <<<"$MIXES"
[ ${#MIX_LIST[@]} -gt 0 ] || die "--mix is empty"
for m in "${MIX_LIST[@]}"; do
  case "$m" in realistic|text|random|zero|idle) ;; *) die "unknown mix '$m' (realistic, text, random, zero, idle)" ;; esac
done
for t in qemu-system-x86_64 python3 cp; do
  command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh)"
done
if [ ! -f "$KERNEL" ] || [ ! -f "$INITRD" ]; then
  log "test guest not built: running scripts/build-guest.sh"
  bash "$ROOT/scripts/build-guest.sh"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Per-capture scratch: QMP and console sockets, console log, pid file. RAM in /dev/shm.
WORK=""
SHM=""
QPID=""

# Sends QMP commands (JSON objects, one per argument) after the handshake; prints the
# 'return' of the last one. Fails on an error reply.
qmp() {
  python3 - "$WORK/qmp.sock" "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()  # greeting
ret = None
for cmd in ['{"execute": "qmp_capabilities"}'] + sys.argv[2:]:
    f.write(cmd + "\n"); f.flush()
    while True:
        line = f.readline()
        if not line:
            if '"quit"' in cmd:
                sys.exit(0)
            sys.exit("QMP connection closed after " + cmd)
        msg = json.loads(line)
        if "error" in msg:
            sys.exit("QMP %s: %s" % (cmd, msg["error"].get("desc", msg["error"])))
        if "return" in msg:
            ret = msg["return"]
            break
print(json.dumps(ret))
PY
}

cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    qmp '{"execute": "quit"}' >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$QPID" 2>/dev/null; then
      kill "$QPID" 2>/dev/null || true
      sleep 0.5
      kill -9 "$QPID" 2>/dev/null || true
    fi
    wait "$QPID" 2>/dev/null || true
  fi
  QPID=""
  [ -n "$SHM" ] && rm -f "$SHM"
  [ -n "$WORK" ] && rm -rf "$WORK"
  SHM=""
  WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

capture() {
  local mix=$1 guest_mix mem rate
  if [ "$mix" = idle ]; then
    guest_mix=realistic mem=8 rate=0
  else
    guest_mix=$mix mem=$MEM_MIB rate=$RATE
  fi
  WORK=$(mktemp -d /tmp/ferry-capture.XXXXXX)
  SHM=/dev/shm/ferry-capture-$$-$mix.ram
  rm -f "$SHM"
  local append="console=ttyS0 panic=-1 quiet ferry.mem_mib=$mem ferry.dirty_mibps=$rate ferry.mix=$guest_mix ferry.seed=$SEED"
  log "$mix: booting a ${VM_MIB} MiB guest: $append"
  local start=$SECONDS
  qemu-system-x86_64 \
    -accel tcg -m "${VM_MIB}M" \
    -object memory-backend-file,id=ram0,size="${VM_MIB}M",mem-path="$SHM",share=on \
    -machine pc-i440fx-7.2,memory-backend=ram0 \
    -nodefaults -vga none -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "$append" \
    -chardev socket,id=ser0,path="$WORK/console.sock",server=on,wait=off,logfile="$WORK/console.log" \
    -serial chardev:ser0 \
    -qmp unix:"$WORK/qmp.sock",server=on,wait=off \
    -pidfile "$WORK/qemu.pid" </dev/null >"$WORK/qemu.out" 2>&1 &
  QPID=$!

  local ready=""
  while :; do
    ready=$(grep -a -m1 '^FERRY-READY' "$WORK/console.log" 2>/dev/null | tr -d '\r' || true)
    [ -n "$ready" ] && break
    if ! kill -0 "$QPID" 2>/dev/null; then
      cat "$WORK/qemu.out" >&2
      die "$mix: QEMU exited before FERRY-READY"
    fi
    if [ $((SECONDS - start)) -ge "$READY_TIMEOUT" ]; then
      tail -n 20 "$WORK/console.log" >&2 2>/dev/null || true
      die "$mix: no FERRY-READY within ${READY_TIMEOUT} s"
    fi
    sleep 0.2
  done
  log "$mix: $ready ($((SECONDS - start)) s after start); running ${DIRTY_SECS} s more"
  sleep "$DIRTY_SECS"

  qmp '{"execute": "stop"}' >/dev/null || die "$mix: QMP stop failed"
  local status
  status=$(qmp '{"execute": "query-status"}') || die "$mix: QMP query-status failed"
  case "$status" in *'"running": false'*) ;; *) die "$mix: VM not paused after stop: $status" ;; esac
  local hb
  hb=$(grep -a '^FERRY-HB' "$WORK/console.log" | tail -n1 | tr -d '\r' || true)

  local dest=$OUT/guest-ram-$mix.bin
  cp --sparse=always "$SHM" "$dest.tmp"
  mv "$dest.tmp" "$dest"
  local shm_alloc dest_alloc
  shm_alloc=$(( $(stat -c '%b * %B' "$SHM") ))
  dest_alloc=$(( $(stat -c '%b * %B' "$dest") ))
  {
    echo "file=guest-ram-$mix.bin"
    echo "captured=$(date -Is)"
    echo "vm_mib=$VM_MIB"
    echo "cmdline=$append"
    echo "ready=$ready"
    echo "last_heartbeat=${hb:-none}"
    echo "dirty_secs=$DIRTY_SECS"
    echo "shm_allocated_bytes=$shm_alloc"
    echo "copy_allocated_bytes=$dest_alloc"
    echo "qemu=$(qemu-system-x86_64 --version | head -n1)"
    [ -f "$ROOT/build/guest/manifest.txt" ] && sed -n 's/^kernel_release=/guest_kernel=/p' "$ROOT/build/guest/manifest.txt"
  } >"$OUT/guest-ram-$mix.txt"
  log "$mix: wrote $dest ($((VM_MIB)) MiB, $((dest_alloc >> 20)) MiB allocated; RAM file had $((shm_alloc >> 20)) MiB allocated in /dev/shm)"
  cleanup
}

for m in "${MIX_LIST[@]}"; do
  capture "$m"
done
log "done: $OUT"
