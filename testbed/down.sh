#!/usr/bin/env bash
# Tears a testbed down (see testbed/up.sh): stops every process inside its namespaces
# (ferryd, the QEMUs they started, iperf3, ...), QEMUs that use its RAM or state
# directories wherever they run, ferry-linkem, then deletes the namespaces and the RAM
# directory. Works from the prefix alone, so it also cleans after a crash of up.sh or of
# the processes; safe to run twice.
#
#   testbed/down.sh [--dir DIR] [--quiet]
#
# The prefix comes from DIR/testbed.env when present, else FERRY_TB_PREFIX (default
# "ferry"); DIR defaults to /tmp/$FERRY_TB_PREFIX-testbed. Logs in DIR are kept.
set -uo pipefail

PREFIX=${FERRY_TB_PREFIX:-ferry}
DIR=""
QUIET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=${2:?}; shift 2 ;;
    --quiet) QUIET=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "down.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "down.sh: run as root" >&2; exit 1; }

DIR=${DIR:-/tmp/$PREFIX-testbed}
ENV_FILE=$DIR/testbed.env
FERRY_TB_LINKEM_PID=""
FERRY_TB_FERRYD_PIDS=""
if [ -f "$ENV_FILE" ]; then
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  PREFIX=${FERRY_TB_PREFIX:-$PREFIX}
fi
RAM_ROOT=/dev/shm/$PREFIX-tb
say() { [ "$QUIET" = 1 ] || echo "down.sh: $*"; }

mapfile -t NAMESPACES < <(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX//./\\.}-h[0-9]+$")

# Pids to stop, in two groups: "hosts" are everything inside our namespaces, the recorded
# ferryd pids, and any process whose command line names our RAM or state directories (QEMU
# started by ferryd); "links" is ferry-linkem (recorded pid, or found by its --host
# arguments). Hosts stop first, while their links still carry their last words.
collect() {
  local want=$1 pids=() p cmd
  if [ "$want" = hosts ]; then
    for n in "${NAMESPACES[@]}"; do
      while read -r p; do [ -n "$p" ] && pids+=("$p"); done < <(ip netns pids "$n" 2>/dev/null)
    done
    for p in $FERRY_TB_FERRYD_PIDS; do pids+=("$p"); done
  else
    [ -n "$FERRY_TB_LINKEM_PID" ] && pids+=("$FERRY_TB_LINKEM_PID")
  fi
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue
    if [ "$want" = hosts ]; then
      case "$cmd" in
        *"--host $PREFIX-h"[0-9]*"=10.77."*) ;;
        *"$RAM_ROOT/"*|*"$DIR/h"[0-9]*"/state/"*|*"$DIR/h"[0-9]*"/ferryd.toml"*) pids+=("$p") ;;
      esac
    else
      case "$cmd" in *"--host $PREFIX-h"[0-9]*"=10.77."*) pids+=("$p") ;; esac
    fi
  done
  # Alive ones only, without duplicates, never ourselves.
  for p in "${pids[@]}"; do
    [ "$p" != "$$" ] && kill -0 "$p" 2>/dev/null && echo "$p"
  done | sort -un
}

stop_group() {
  local pids=() p alive
  mapfile -t pids < <(collect "$1")
  [ ${#pids[@]} -gt 0 ] || return 0
  say "stopping $1: $(for p in "${pids[@]}"; do printf '%s(%s) ' "$p" "$(cat /proc/"$p"/comm 2>/dev/null)"; done)"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then say "pid $p did not stop within 5 s of SIGTERM: SIGKILL"; kill -KILL "$p" 2>/dev/null; fi
  done
  # Children started while their parents were stopping.
  sleep 0.2
  mapfile -t pids < <(collect "$1")
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  return 0
}
stop_group hosts
stop_group links

for n in "${NAMESPACES[@]}"; do
  if ip netns del "$n" 2>/dev/null; then say "deleted namespace $n"; else echo "down.sh: could not delete namespace $n" >&2; fi
done
if [ -e "$RAM_ROOT" ]; then rm -rf "$RAM_ROOT" && say "removed $RAM_ROOT"; fi
rm -f "$ENV_FILE" "$DIR/linkem.ready"

left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -cE "^${PREFIX//./\\.}-h[0-9]+$")
if [ "$left" != 0 ] || [ -e "$RAM_ROOT" ]; then
  echo "down.sh: something is left: $left namespaces, $RAM_ROOT $( [ -e "$RAM_ROOT" ] && echo present || echo gone)" >&2
  exit 1
fi
say "testbed '$PREFIX' is down"
