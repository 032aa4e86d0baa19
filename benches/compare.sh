#!/usr/bin/env bash
# The migration benchmark: ferry (codecs none, lz4, zstd-1, zstd-3) against QEMU's own
# migration (plain TCP, multifd 2 channels, multifd + zstd) on the same testbed link, same
# guest, same run. See benches/harness.py for what is measured and how.
#
#   benches/compare.sh                       wan link, 1 GiB guest, dirty 0 and 50 MiB/s, 3 runs each
#   PROFILE=far DIRTY=50 REPEAT=2 benches/compare.sh
#   METHODS=ferry-zstd1,qemu-plain benches/compare.sh
#
# Environment: PROFILE (lan|dc|wan|far, default wan), GUEST_MIB (1024), WORKLOAD_MIB (512),
# MIX (realistic|zero|text|random), DIRTY (comma list, MiB/s, default "0,50"), REPEAT (3),
# METHODS (comma list, default all), PERF=1 (perf record both agents in each ferry run: flame
# graphs and CPU per stage in OUT/profiles; needs linux-perf and `cargo install inferno`), FERRY_FLAGS (extra `ferryctl migrate` flags for the ferry
# runs, e.g. "--on-stall abort"), OUT (default benches/out/<profile>-<date>), FERRY_BIN
# (binaries to run instead of building this tree's).
# Writes OUT/results.json, OUT/table.md, OUT/plot.png; exits non-zero if any run failed
# (migration error, guest memory check failed, or source and target RAM differ).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PROFILE=${PROFILE:-wan}
OUT=${OUT:-$ROOT/benches/out/$PROFILE-$(date +%Y%m%d-%H%M%S)}
[ "$(id -u)" = 0 ] || { echo "compare.sh: run as root (testbed namespaces)" >&2; exit 1; }

bash scripts/install-deps.sh
if ! /usr/bin/python3 -c "import matplotlib" 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib >/dev/null
fi
bash scripts/build-guest.sh >/dev/null
if [ -n "${PERF:-}" ]; then
  command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
  command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
fi
# FERRY_BIN: a directory of binaries built earlier (e.g. another commit's, for an A/B on
# the same machine state); nothing is built then.
if [ -n "${FERRY_BIN:-}" ]; then
  BIN=$FERRY_BIN
else
  cargo build --release -p ferry-agent -p ferryctl -p ferry-linkem -p ferry-testkit
  BIN=$ROOT/target/release
fi

export FERRY_TB_PREFIX=fbench
DIR=/tmp/fbench-testbed
trap 'testbed/down.sh --dir "$DIR" --quiet >/dev/null 2>&1 || true' EXIT
testbed/down.sh --dir "$DIR" --quiet >/dev/null 2>&1 || true
testbed/up.sh --hosts 2 --profile "$PROFILE" --dir "$DIR" --retain-source-ram \
  --ferryd "$BIN/ferryd" --ferryctl "$BIN/ferryctl" --linkem "$BIN/ferry-linkem"

/usr/bin/python3 benches/harness.py --testbed-env "$DIR/testbed.env" --bin "$BIN" --root "$ROOT" \
  --out "$OUT" --profile "$PROFILE" --guest-mib "${GUEST_MIB:-1024}" --workload-mib "${WORKLOAD_MIB:-512}" \
  --mix "${MIX:-realistic}" --dirty "${DIRTY:-0,50}" --repeat "${REPEAT:-3}" \
  ${METHODS:+--methods "$METHODS"} --ferry-flags "${FERRY_FLAGS:-}" ${PERF:+--perf}
