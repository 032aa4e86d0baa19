#!/usr/bin/env bash
# Manual smoke test of the ferry test guest (build it first: scripts/build-guest.sh).
# Boots build/guest/{vmlinuz,initramfs.cpio.gz} under QEMU (-accel tcg, 512 MiB RAM in
# /dev/shm/ferry-smoke), waits for FERRY-READY in the console log, lets the guest dirty
# memory, measures the dirty rate from the heartbeats, then exercises the console
# protocol (ping, check, pause, digest, resume, rate, an unknown command), quits QEMU
# and removes its files. Exits non-zero on any failure.
#
# Options:
#   --mem-mib N      workload region (default 128)
#   --rate R         dirty rate in MiB/s (default 20)
#   --mix M          realistic|zero|text|random (default: the guest's default, realistic)
#   --dirty-secs S   how long to let it dirty before 'check' (default 6)
#   --disk           also attach a 64 MiB virtio-blk disk and require /dev/vda in the guest
#   --timeout S      seconds to wait for FERRY-READY (default 300)
set -euo pipefail

MEM_MIB=128
RATE=20
MIX=""
DIRTY_SECS=6
DISK=0
READY_TIMEOUT=300
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --mem-mib) MEM_MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --mix) MIX=$2; shift 2 ;;
    --dirty-secs) DIRTY_SECS=$2; shift 2 ;;
    --disk) DISK=1; shift ;;
    --timeout) READY_TIMEOUT=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "boot-guest: unknown argument $1" >&2; usage ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KERNEL=$ROOT/build/guest/vmlinuz
INITRD=$ROOT/build/guest/initramfs.cpio.gz
for f in "$KERNEL" "$INITRD"; do
  [ -f "$f" ] || { echo "boot-guest: $f missing: run scripts/build-guest.sh" >&2; exit 1; }
done

SOCK=/tmp/ferry-smoke.sock
LOG=/tmp/ferry-smoke.log
QMP=/tmp/ferry-smoke-qmp.sock
SHM=/dev/shm/ferry-smoke
PIDFILE=/tmp/ferry-smoke.pid
DISKIMG=/tmp/ferry-smoke-disk.raw

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "boot-guest: a smoke VM is already running (pid $(cat "$PIDFILE"), $PIDFILE)" >&2
  exit 1
fi
rm -f "$SOCK" "$LOG" "$QMP" "$SHM" "$PIDFILE" "$DISKIMG"

QPID=""
qmp_quit() {
  python3 - "$QMP" <<'PY' 2>/dev/null
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()  # greeting
for cmd in ("qmp_capabilities", "quit"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        msg = json.loads(f.readline())
        if "return" in msg or "error" in msg:
            break
PY
}
cleanup() {
  if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
    qmp_quit || true
    for _ in $(seq 1 50); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$QPID" 2>/dev/null; then
      kill "$QPID" 2>/dev/null || true
      sleep 0.5
      kill -9 "$QPID" 2>/dev/null || true
    fi
    wait "$QPID" 2>/dev/null || true
  fi
  rm -f "$SOCK" "$LOG" "$QMP" "$SHM" "$PIDFILE" "$DISKIMG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

APPEND="console=ttyS0 panic=-1 quiet ferry.mem_mib=$MEM_MIB ferry.dirty_mibps=$RATE"
[ -n "$MIX" ] && APPEND="$APPEND ferry.mix=$MIX"
EXTRA=()
if [ "$DISK" = 1 ]; then
  truncate -s 64M "$DISKIMG"
  EXTRA=(-blockdev "driver=file,filename=$DISKIMG,node-name=disk0"
         -device virtio-blk-pci,drive=disk0,id=vblk0)
  APPEND="$APPEND ferry.debug=1"
fi

START=$(date +%s.%N)
qemu-system-x86_64 \
  -accel tcg -m 512M \
  -object memory-backend-file,id=ram0,size=512M,mem-path="$SHM",share=on \
  -machine pc-i440fx-7.2,memory-backend=ram0 \
  -nodefaults -vga none -display none -no-reboot \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "$APPEND" \
  -chardev socket,id=ser0,path="$SOCK",server=on,wait=off,logfile="$LOG" \
  -serial chardev:ser0 \
  -qmp unix:"$QMP",server=on,wait=off \
  -pidfile "$PIDFILE" \
  "${EXTRA[@]}" &
QPID=$!
echo "boot-guest: qemu pid $QPID, console $SOCK, log $LOG"

set +e
python3 - "$START" "$LOG" "$SOCK" "$READY_TIMEOUT" "$DIRTY_SECS" "$RATE" "$DISK" "$QPID" <<'PY'
import os, re, socket, sys, threading, time, queue

start, log_path, sock_path = float(sys.argv[1]), sys.argv[2], sys.argv[3]
ready_timeout, dirty_secs, rate = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
want_disk, qpid = sys.argv[7] == "1", int(sys.argv[8])
failures = []

def qemu_alive():
    try:
        os.kill(qpid, 0)
        return True
    except OSError:
        return False

def log_text():
    try:
        with open(log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""

def die(msg):
    print("boot-guest: FAIL: " + msg)
    tail = log_text().replace("\r", "").splitlines()[-30:]
    print("---- console log (tail) ----\n" + "\n".join(tail))
    sys.exit(1)

# Connect to the console socket (QEMU creates it shortly after start).
sock = None
deadline = time.time() + 30
while sock is None:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        sock = s
    except OSError:
        if time.time() > deadline or not qemu_alive():
            die("cannot connect to the console socket " + sock_path)
        time.sleep(0.05)

# Reader thread: console lines from the socket, with host receive times.
lines = queue.Queue()
def reader():
    buf = b""
    while True:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            lines.put((time.time(), None))
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.put((time.time(), line.decode("utf-8", "replace").strip("\r")))
threading.Thread(target=reader, daemon=True).start()

# 1. FERRY-READY in the log.
while True:
    m = re.search(r"^FERRY-READY pages=(\d+) mix=(\S+) rate=(\S+)", log_text(), re.M)
    if m:
        ready_s = time.time() - start
        break
    if not qemu_alive():
        die("QEMU exited before FERRY-READY")
    if time.time() - start > ready_timeout:
        die("no FERRY-READY within %.0f s" % ready_timeout)
    time.sleep(0.05)
pages = int(m.group(1))
print("boot-guest: %s (%.1f s after QEMU start)" % (m.group(0), ready_s))
if want_disk:
    d = re.search(r"^ferry-init: block devices: (.*)$", log_text(), re.M)
    mods = re.search(r"^ferry-init: modules: (.*)$", log_text(), re.M)
    print("boot-guest: guest modules: %s" % (mods.group(1).strip() if mods else "?"))
    if not d or "vda" not in d.group(1).split():
        die("virtio-blk disk not visible in the guest (%s)" % (d.group(0) if d else "no ferry-init lines"))
    print("boot-guest: guest block devices: " + d.group(1).strip())

def send(cmd):
    sock.sendall((cmd + "\n").encode())

def expect(prefix, timeout, on_other=None):
    """Next console line starting with prefix; other lines go to on_other."""
    end = time.time() + timeout
    while True:
        left = end - time.time()
        if left <= 0:
            die("no %s reply within %.0f s" % (prefix, timeout))
        try:
            t, line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            die("console closed while waiting for " + prefix)
        if line.startswith(prefix):
            return t, line
        if on_other:
            on_other(t, line)

def command(cmd, prefix, timeout=30, on_other=None):
    t0 = time.time()
    send(cmd)
    t, line = expect(prefix, timeout, on_other)
    print("boot-guest: %-8s -> %s  (%.2f s)" % (cmd, line, t - t0))
    return t, line

hbs = []
def note(t, line):
    m = re.match(r"FERRY-HB t=(\d+) writes=(\d+)", line)
    if m:
        hbs.append((t, int(m.group(1)), int(m.group(2))))

# 2. Let it dirty; collect heartbeats (and host-timed pings).
t_p1, l = command("ping", "FERRY-PONG", on_other=note)
w_p1 = int(l.split("writes=")[1])
end = time.time() + dirty_secs
while time.time() < end:
    try:
        t, line = lines.get(timeout=max(0.01, end - time.time()))
    except queue.Empty:
        continue
    if line is None:
        die("console closed")
    note(t, line)
t_p2, l = command("ping", "FERRY-PONG", on_other=note)
w_p2 = int(l.split("writes=")[1])
if len(hbs) < 2:
    die("fewer than 2 heartbeats in %.0f s" % dirty_secs)
(_, t1, w1), (_, t2, w2) = hbs[0], hbs[-1]
hb_rate = (w2 - w1) / (t2 - t1) * 4096 / 2**20 if t2 > t1 else 0.0
host_rate = (w_p2 - w_p1) / (t_p2 - t_p1) * 4096 / 2**20
print("boot-guest: heartbeats: %d, last %s" % (len(hbs), "FERRY-HB t=%d writes=%d" % (t2, w2)))
print("boot-guest: dirty rate configured %.2f MiB/s, measured %.2f MiB/s (guest clock, HB t=%d..%d), "
      "%.2f MiB/s (host clock, ping)" % (rate, hb_rate, t1, t2, host_rate))
if rate > 0 and abs(hb_rate - rate) > 0.1 * rate:
    print("boot-guest: WARNING: measured dirty rate is more than 10% off the configured one")

# 3. Protocol round.
_, l = command("check", "FERRY-CHECK", timeout=300, on_other=note)
if not l.startswith("FERRY-CHECK ok pages=%d " % pages):
    failures.append("check: " + l)
command("pause", "FERRY-PAUSED", on_other=note)
_, p1 = command("ping", "FERRY-PONG", on_other=note)
_, d1 = command("digest", "FERRY-DIGEST", timeout=300, on_other=note)
time.sleep(1.5)
_, p2 = command("ping", "FERRY-PONG", on_other=note)
_, d2 = command("digest", "FERRY-DIGEST", timeout=300, on_other=note)
if not re.fullmatch(r"FERRY-DIGEST [0-9a-f]{16}", d1):
    failures.append("digest reply malformed: " + d1)
if p1 != p2:
    failures.append("writes changed while paused: %s / %s" % (p1, p2))
if d1 != d2:
    failures.append("digest changed while paused: %s / %s" % (d1, d2))
command("resume", "FERRY-RESUMED", on_other=note)
_, l = command("rate 5", "FERRY-RATE", on_other=note)
if l != "FERRY-RATE 5":
    failures.append("rate reply: " + l)
_, l = command("bogus", "FERRY-ERR", on_other=note)
if l != "FERRY-ERR unknown command":
    failures.append("unknown-command reply: " + l)
time.sleep(1)
_, l = command("check", "FERRY-CHECK", timeout=300, on_other=note)
if not l.startswith("FERRY-CHECK ok "):
    failures.append("second check: " + l)

if failures:
    die("; ".join(failures))
print("boot-guest: OK")
PY
rc=$?
set -e
exit $rc
