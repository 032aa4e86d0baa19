#!/usr/bin/env bash
# Quick check of a running testbed's link between two hosts: RTT (ping, 20 probes) and
# TCP throughput (iperf3, else a python3 sender/receiver), plus what ferry-linkem counted
# on that direction meanwhile (segments forwarded, lost to emulated loss, dropped by the
# queue).
#
#   testbed/measure.sh [--dir DIR] [--from I] [--to J] [--time SECONDS] [--pings N]
#                      [--parallel N] [--python]
#
#   --from/--to   host numbers (default 1 -> 2); throughput is measured from -> to
#   --time        seconds of throughput test (default 10)
#   --pings       RTT probes (default 20, 0.2 s apart)
#   --parallel    iperf3 parallel streams (default 1)
#   --python      use the python3 tools even if ping/iperf3 are installed
#
# Reads DIR/testbed.env written by testbed/up.sh (DIR default /tmp/$FERRY_TB_PREFIX-testbed).
# Traffic stays between the testbed's namespaces. Install iperf3 and ping with
# testbed/install-tools.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NETCHECK=$ROOT/testbed/netcheck.py
PREFIX=${FERRY_TB_PREFIX:-ferry}
DIR=""
FROM=1
TO=2
TIME=10
PINGS=20
PARALLEL=1
PYTHON=0
die() { echo "measure.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=${2:?}; shift 2 ;;
    --from) FROM=${2:?}; shift 2 ;;
    --to) TO=${2:?}; shift 2 ;;
    --time) TIME=${2:?}; shift 2 ;;
    --pings) PINGS=${2:?}; shift 2 ;;
    --parallel) PARALLEL=${2:?}; shift 2 ;;
    --python) PYTHON=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (ip netns exec)"
DIR=${DIR:-/tmp/$PREFIX-testbed}
[ -f "$DIR/testbed.env" ] || die "no testbed in $DIR (no testbed.env): start one with testbed/up.sh"
# shellcheck disable=SC1090,SC1091
. "$DIR/testbed.env"
[ "$FROM" -ge 1 ] && [ "$FROM" -le "$FERRY_TB_HOSTS" ] && [ "$TO" -ge 1 ] && [ "$TO" -le "$FERRY_TB_HOSTS" ] && [ "$FROM" != "$TO" ] \
  || die "--from/--to must be two different hosts in 1..$FERRY_TB_HOSTS"
kill -0 "$FERRY_TB_LINKEM_PID" 2>/dev/null || die "ferry-linkem (pid $FERRY_TB_LINKEM_PID) is not running: testbed/down.sh, then up.sh again"

v() { local n="FERRY_TB_H${1}_$2"; echo "${!n}"; }
NS_A=$(v "$FROM" NETNS); ADDR_A=$(v "$FROM" ADDR)
NS_B=$(v "$TO" NETNS); ADDR_B=$(v "$TO" ADDR)
TMP=$(mktemp -d)
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}, d))" "$@"; }
snapshot() { # fresh counters: SIGUSR1 makes ferry-linkem write its stats file now
  kill -USR1 "$FERRY_TB_LINKEM_PID" 2>/dev/null || true
  sleep 0.3
  cp "$FERRY_TB_LINKEM_STATS" "$1" 2>/dev/null || echo '{"links":[]}' >"$1"
}

echo "== testbed '$FERRY_TB_PREFIX', profile $FERRY_TB_PROFILE ${FERRY_TB_SHAPE// /}"
echo "== $NS_A ($ADDR_A) -> $NS_B ($ADDR_B)"

# --- RTT ---------------------------------------------------------------------------------
if [ "$PYTHON" = 0 ] && command -v ping >/dev/null; then
  out=$(ip netns exec "$NS_A" ping -c "$PINGS" -i 0.2 -q "$ADDR_B" || true)
  echo "$out" | grep -E "packets transmitted|rtt" | sed 's/^/   ping: /'
  RTT=$(echo "$out" | sed -n 's|.*= \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\)/.*|min \1 / avg \2 / max \3 ms|p')
else
  ip netns exec "$NS_B" python3 "$NETCHECK" udp-echo "$ADDR_B" 5298 --timeout 3 &
  SERVER_PID=$!
  sleep 0.3
  ip netns exec "$NS_A" python3 "$NETCHECK" udp-ping "$ADDR_B" 5298 "$PINGS" >"$TMP/ping.json"
  wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  RTT=$(json "$TMP/ping.json" '"min %.3f / avg %.3f / max %.3f ms (UDP echo, %d/%d answered)" % (min_ms, avg_ms, max_ms, received, sent) if received else "no answer"')
  echo "   udp-ping: $RTT"
fi

# --- throughput --------------------------------------------------------------------------
snapshot "$TMP/before.json"
if [ "$PYTHON" = 0 ] && command -v iperf3 >/dev/null; then
  ip netns exec "$NS_B" iperf3 -s -1 -B "$ADDR_B" -p 5299 >"$TMP/server.log" 2>&1 &
  SERVER_PID=$!
  # Wait for the listener without connecting to it (iperf3 -s -1 serves one client).
  for _ in $(seq 50); do
    ip netns exec "$NS_B" ss -Hltn "sport = :5299" 2>/dev/null | grep -q . && break
    sleep 0.1
  done
  ip netns exec "$NS_A" iperf3 -c "$ADDR_B" -p 5299 -t "$TIME" -P "$PARALLEL" -J >"$TMP/iperf.json" 2>&1 || true
  wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  python3 "$NETCHECK" iperf-summary "$TMP/iperf.json" >"$TMP/tput.json" || die "iperf3 failed: $(head -c 400 "$TMP/iperf.json")"
  TOOL="iperf3 -t $TIME -P $PARALLEL"
  TPUT=$(json "$TMP/tput.json" '"error: " + d["error"] if "error" in d else "%.0f Mbit/s received (sender %.0f Mbit/s, %s retransmits)" % (receiver_bps/1e6, sender_bps/1e6, retransmits)')
else
  ip netns exec "$NS_B" python3 "$NETCHECK" tcp-server "$ADDR_B" 5299 --timeout $((TIME + 30)) >"$TMP/tput.json" &
  SERVER_PID=$!
  sleep 0.3
  ip netns exec "$NS_A" python3 "$NETCHECK" tcp-client "$ADDR_B" 5299 "$TIME" >"$TMP/client.json"
  wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  TOOL="python3 netcheck.py, 1 stream, $TIME s"
  TPUT=$(json "$TMP/tput.json" '"%.0f Mbit/s received" % (bits_per_second/1e6)')
fi
snapshot "$TMP/after.json"
python3 "$NETCHECK" link-delta "$TMP/before.json" "$TMP/after.json" "$NS_A" "$NS_B" >"$TMP/delta.json"
LINK=$(json "$TMP/delta.json" '"%d segments in %d packets (%.1f per packet), lost to emulated loss %d (%.3f%%), queue drops %d (%.3f%%)" % (forwarded_segments, forwarded_packets, segments_per_packet, loss_dropped_segments, loss_percent, queue_dropped_segments, queue_drop_percent)')

echo "   TCP ($TOOL): $TPUT"
echo "   ferry-linkem $NS_A -> $NS_B: $LINK"
echo "RESULT profile=$FERRY_TB_PROFILE rtt=[$RTT] tcp=[$TPUT] link=[$LINK]"
