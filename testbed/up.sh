#!/usr/bin/env bash
# Brings up a testbed of N hosts on emulated links (see testbed/README.md):
#   network namespaces PREFIX-h1..hN, each with a TUN device "ferry0" at 10.77.0.i/24,
#   joined by ferry-linkem (rate, queue, loss, delay per direction), and optionally one
#   ferryd per host.
#
#   testbed/up.sh [--hosts N] [--profile lan|dc|wan|far] [--rate R] [--rtt T] [--loss P]
#                 [--ferryd PATH] [--ferryctl PATH] [--linkem PATH] [--dir DIR]
#                 [--retain-source-ram] [-- EXTRA FERRY-LINKEM ARGS...]
#
#   --hosts N       number of hosts (default 3, at most 250)
#   --profile P     lan (no shaping, default), dc (10 Gbit/s, 0.5 ms RTT),
#                   wan (1 Gbit/s, 20 ms RTT), far (200 Mbit/s, 50 ms RTT, 0.1% loss)
#   --rate/--rtt/--loss  override the profile (500mbit, 10ms, 0.01 or 1%)
#   --ferryd PATH   also start ferryd in every host (dev PKI, configs under DIR)
#   --ferryctl PATH ferryctl used for `certs init` (default: next to ferryd, then target/)
#   --linkem PATH   the ferry-linkem binary (default: target/release, then target/debug,
#                   else it is built with cargo)
#   --dir DIR       where configs, logs, PKI and testbed.env go
#                   (default /tmp/$FERRY_TB_PREFIX-testbed)
#   --retain-source-ram  ferryd keeps a migrated guest's source RAM (benchmark check)
#   after --         more ferry-linkem arguments, e.g. -- --link ferry-h1,ferry-h3=far
#
# Environment: FERRY_TB_PREFIX (default "ferry") names the namespaces PREFIX-hI and the
# RAM directory /dev/shm/PREFIX-tb; FERRY_TB_CONGESTION (bbr|cubic|cubic-filtered) ferryd's QUIC congestion
# controller. Needs root. testbed/down.sh undoes everything.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${FERRY_TB_PREFIX:-ferry}
HOSTS=3
PROFILE=lan
FERRYD=""
FERRYCTL=""
LINKEM=""
DIR=""
SHAPE_ARGS=()
EXTRA=()
RETAIN=false

die() { echo "up.sh: $*" >&2; exit 1; }
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=${2:?}; shift 2 ;;
    --profile) PROFILE=${2:?}; shift 2 ;;
    --rate|--rtt|--loss) SHAPE_ARGS+=("$1" "${2:?}"); shift 2 ;;
    --ferryd) FERRYD=${2:?}; shift 2 ;;
    --ferryctl) FERRYCTL=${2:?}; shift 2 ;;
    --linkem) LINKEM=${2:?}; shift 2 ;;
    --dir) DIR=${2:?}; shift 2 ;;
    --retain-source-ram) RETAIN=true; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "up.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces and TUN devices)"
[[ "$PREFIX" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$ ]] || die "FERRY_TB_PREFIX '$PREFIX': use up to 16 letters, digits, - _ ."
[[ "$HOSTS" =~ ^[0-9]+$ ]] && [ "$HOSTS" -ge 2 ] && [ "$HOSTS" -le 250 ] || die "--hosts must be 2..250"
case "$PROFILE" in lan|dc|wan|far) ;; *) die "--profile must be lan, dc, wan or far (custom: --rate/--rtt/--loss)" ;; esac
command -v ip >/dev/null || die "'ip' (iproute2) is not installed"
[ -e /dev/net/tun ] || die "/dev/net/tun is missing (modprobe tun)"

DIR=${DIR:-/tmp/$PREFIX-testbed}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
RAM_ROOT=/dev/shm/$PREFIX-tb
ENV_FILE=$DIR/testbed.env

# --- refuse to stack a second testbed on the same prefix -----------------------------
existing=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX//./\\.}-h[0-9]+$" || true)
if [ -n "$existing" ]; then
  die "a testbed with prefix '$PREFIX' is already up (namespaces: $(echo $existing)); run testbed/down.sh${DIR:+ --dir $DIR} first, or set FERRY_TB_PREFIX for another one"
fi
if [ -f "$ENV_FILE" ]; then
  # shellcheck disable=SC1090
  old_pid=$( (. "$ENV_FILE"; echo "${FERRY_TB_LINKEM_PID:-}") )
  if [ -n "$old_pid" ] && kill -0 "$old_pid" 2>/dev/null; then
    die "$ENV_FILE names a running ferry-linkem (pid $old_pid): run testbed/down.sh --dir $DIR first"
  fi
fi

# --- binaries ------------------------------------------------------------------------
if [ -z "$LINKEM" ]; then
  for c in "$ROOT/target/release/ferry-linkem" "$ROOT/target/debug/ferry-linkem"; do
    [ -x "$c" ] && { LINKEM=$c; break; }
  done
fi
if [ -z "$LINKEM" ]; then
  echo "up.sh: building ferry-linkem (cargo build --release -p ferry-linkem)"
  (cd "$ROOT" && cargo build --release -p ferry-linkem) || die "building ferry-linkem failed"
  LINKEM=$ROOT/target/release/ferry-linkem
fi
[ -x "$LINKEM" ] || die "ferry-linkem binary '$LINKEM' is not executable"
if [ -n "$FERRYD" ]; then
  [ -x "$FERRYD" ] || die "--ferryd '$FERRYD' is not an executable file"
  FERRYD=$(cd "$(dirname "$FERRYD")" && pwd)/$(basename "$FERRYD")
  if [ -z "$FERRYCTL" ]; then
    for c in "$(dirname "$FERRYD")/ferryctl" "$ROOT/target/debug/ferryctl" "$ROOT/target/release/ferryctl"; do
      [ -x "$c" ] && { FERRYCTL=$c; break; }
    done
  fi
  [ -n "$FERRYCTL" ] && [ -x "$FERRYCTL" ] || die "ferryctl not found: build it (cargo build -p ferryctl) or give --ferryctl PATH"
fi

# --- on failure, undo what was done ---------------------------------------------------
ok=0
on_exit() {
  if [ "$ok" != 1 ]; then
    echo "up.sh: failed; cleaning up with testbed/down.sh" >&2
    [ -f "$DIR/linkem.log" ] && { echo "--- $DIR/linkem.log" >&2; tail -n 20 "$DIR/linkem.log" >&2; }
    FERRY_TB_PREFIX=$PREFIX bash "$ROOT/testbed/down.sh" --dir "$DIR" --quiet || true
  fi
}
trap on_exit EXIT

ns() { echo "$PREFIX-h$1"; }
addr() { echo "10.77.0.$1"; }

# --- namespaces and the emulated links -----------------------------------------------
rm -f "$ENV_FILE" "$DIR/linkem.ready"
host_args=()
for i in $(seq "$HOSTS"); do
  ip netns add "$(ns "$i")"
  host_args+=(--host "$(ns "$i")=$(addr "$i")/24")
done

# setsid: ferry-linkem outlives this script and its terminal; down.sh stops it.
setsid "$LINKEM" "${host_args[@]}" --profile "$PROFILE" "${SHAPE_ARGS[@]}" \
  --ready-file "$DIR/linkem.ready" --stats-file "$DIR/linkem-stats.json" "${EXTRA[@]}" \
  >"$DIR/linkem.log" 2>&1 </dev/null &
LINKEM_PID=$!
for _ in $(seq 100); do
  [ -f "$DIR/linkem.ready" ] && break
  kill -0 "$LINKEM_PID" 2>/dev/null || die "ferry-linkem exited during start-up"
  sleep 0.1
done
[ -f "$DIR/linkem.ready" ] || die "ferry-linkem did not get ready within 10 s"
head -n 1 "$DIR/linkem.log"

# --- ferryd per host -------------------------------------------------------------------
# The host's cgroup cpu controller, mounted again inside `ip netns exec` (see below).
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  CGROUP_MOUNT='mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || true'
else
  CGROUP_MOUNT='mount -t tmpfs cgroup_root /sys/fs/cgroup 2>/dev/null && mkdir -p /sys/fs/cgroup/cpu && mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu 2>/dev/null || true'
fi
FERRYD_PIDS=()
if [ -n "$FERRYD" ]; then
  cert_hosts=()
  for i in $(seq "$HOSTS"); do cert_hosts+=(--host "h$i:$(addr "$i")"); done
  "$FERRYCTL" certs init --dir "$DIR/pki" "${cert_hosts[@]}" --operator operator >/dev/null \
    || die "ferryctl certs init failed"
  for i in $(seq "$HOSTS"); do
    h=h$i
    # Every testbed starts empty: a journal left by an earlier one would bring back its VMs.
    rm -rf "${DIR:?}/$h/state" "${RAM_ROOT:?}/$h"
    mkdir -p "$DIR/$h/state" "$RAM_ROOT/$h"
    # FERRY_TB_QEMU_H<i>: this host's QEMU binary (e.g. 7.2 from scripts/install-qemu72.sh
    # beside the installed 10.0, to test rolling upgrades); default: the installed one.
    qvar=FERRY_TB_QEMU_H$i
    qemu=${!qvar:-qemu-system-x86_64}
    # FERRY_TB_MIGRATION_EXTRA: more [migration] lines for every host (e.g. limits).
    cat >"$DIR/$h/ferryd.toml" <<TOML
# Written by testbed/up.sh for host $h (namespace $(ns "$i")).
host_name = "$h"
grpc_listen = "$(addr "$i"):7701"
quic_listen = "$(addr "$i"):7711"
ram_dir = "$RAM_ROOT/$h"
state_dir = "$DIR/$h/state"
accel = "tcg"            # /dev/kvm here cannot boot a guest; production uses kvm
storage_roots = ["$DIR/$h/images"]
boot_roots = ["${FERRY_TB_BOOT_ROOT:-$ROOT/build/guest}"]   # direct-boot kernels only from here
qemu_binary = "$qemu"
[tls]
ca = "$DIR/pki/ca.pem"
cert = "$DIR/pki/$h.pem"
key = "$DIR/pki/$h.key"
[migration]
retain_source_ram = $RETAIN
congestion = "${FERRY_TB_CONGESTION:-cubic-filtered}"
${FERRY_TB_MIGRATION_EXTRA:-}
TOML
    # `ip netns exec` execs ferryd in place (through sh, which execs it too), so $! is
    # ferryd's pid. It also mounts a fresh /sys, without the host's cgroup mounts: they
    # are mounted again in that private mount namespace, or `--on-stall throttle` finds
    # no cpu controller.
    setsid ip netns exec "$(ns "$i")" sh -c "$CGROUP_MOUNT"'; exec "$0" "$@"' \
      "$FERRYD" --config "$DIR/$h/ferryd.toml" \
      >"$DIR/$h/ferryd.log" 2>&1 </dev/null &
    FERRYD_PIDS+=($!)
  done
  # Wait for every gRPC port to accept connections (inside its namespace).
  for i in $(seq "$HOSTS"); do
    up=0
    for _ in $(seq 150); do
      if ip netns exec "$(ns "$i")" bash -c "exec 3<>/dev/tcp/$(addr "$i")/7701" 2>/dev/null; then up=1; break; fi
      kill -0 "${FERRYD_PIDS[$((i-1))]}" 2>/dev/null || break
      sleep 0.2
    done
    if [ "$up" != 1 ]; then
      echo "--- $DIR/h$i/ferryd.log" >&2; tail -n 20 "$DIR/h$i/ferryd.log" >&2
      die "ferryd of h$i did not start listening on $(addr "$i"):7701"
    fi
  done
fi

# --- testbed.env -----------------------------------------------------------------------
{
  echo "# Written by testbed/up.sh on $(date -Is). Source it: . $ENV_FILE"
  echo "FERRY_TB_PREFIX=$PREFIX"
  echo "FERRY_TB_DIR=$DIR"
  echo "FERRY_TB_HOSTS=$HOSTS"
  echo "FERRY_TB_PROFILE=$PROFILE"
  echo "FERRY_TB_SHAPE=\"${SHAPE_ARGS[*]} ${EXTRA[*]}\""
  echo "FERRY_TB_RAM_ROOT=$RAM_ROOT"
  echo "FERRY_TB_LINKEM=$LINKEM"
  echo "FERRY_TB_LINKEM_PID=$LINKEM_PID"
  echo "FERRY_TB_LINKEM_STATS=$DIR/linkem-stats.json"
  echo "FERRY_TB_NETNS=\"$(for i in $(seq "$HOSTS"); do printf '%s ' "$(ns "$i")"; done | sed 's/ $//')\""
  echo "FERRY_TB_ADDRS=\"$(for i in $(seq "$HOSTS"); do printf '%s ' "$(addr "$i")"; done | sed 's/ $//')\""
  echo "FERRY_TB_FERRYD=${FERRYD}"
  echo "FERRY_TB_FERRYCTL=${FERRYCTL}"
  echo "FERRY_TB_FERRYD_PIDS=\"${FERRYD_PIDS[*]}\""
  [ -n "$FERRYD" ] && echo "FERRY_TB_PKI_DIR=$DIR/pki"
  for i in $(seq "$HOSTS"); do
    echo "FERRY_TB_H${i}_NETNS=$(ns "$i")"
    echo "FERRY_TB_H${i}_ADDR=$(addr "$i")"
    if [ -n "$FERRYD" ]; then
      echo "FERRY_TB_H${i}_GRPC=$(addr "$i"):7701"
      echo "FERRY_TB_H${i}_QUIC=$(addr "$i"):7711"
      echo "FERRY_TB_H${i}_FERRYD_PID=${FERRYD_PIDS[$((i-1))]}"
      echo "FERRY_TB_H${i}_CONFIG=$DIR/h$i/ferryd.toml"
    fi
  done
} >"$ENV_FILE"

ok=1
echo "testbed up: $HOSTS hosts ($(ns 1)..$(ns "$HOSTS"), 10.77.0.1..$HOSTS), profile $PROFILE${SHAPE_ARGS[*]:+ ${SHAPE_ARGS[*]}}"
echo "  ferry-linkem pid $LINKEM_PID (log $DIR/linkem.log, counters: kill -USR1 $LINKEM_PID or $DIR/linkem-stats.json)"
if [ -n "$FERRYD" ]; then
  echo "  ferryd pids ${FERRYD_PIDS[*]} (logs $DIR/hI/ferryd.log); try:"
  echo "    ip netns exec $(ns 1) $FERRYCTL --agent $(addr 1):7701 --pki-dir $DIR/pki --identity operator vm list"
fi
echo "  env: $ENV_FILE; measure: testbed/measure.sh --dir $DIR; stop: testbed/down.sh --dir $DIR"
