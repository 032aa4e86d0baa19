#!/bin/bash
# Several live migrations at once between two testbed hosts (benches/concurrent.py): the
# time until all are done and the agents' CPU, for a build's binaries.
#   FERRY_BIN=DIR PROFILE=wan VMS=2 REPEAT=2 DIRTY=20 OUT=benches/out/NAME benches/concurrent.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PROFILE=${PROFILE:-wan}
OUT=${OUT:-benches/out/concurrent-$PROFILE}
bash scripts/install-deps.sh
bash scripts/build-guest.sh >/dev/null
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
testbed/up.sh --hosts 2 --profile "$PROFILE" --dir "$DIR" \
  --ferryd "$BIN/ferryd" --ferryctl "$BIN/ferryctl" --linkem "$BIN/ferry-linkem"
/usr/bin/python3 benches/concurrent.py --testbed-env "$DIR/testbed.env" --bin "$BIN" --root "$ROOT" \
  --out "$OUT" --vms "${VMS:-2}" --guest-mib "${GUEST_MIB:-512}" --workload-mib "${WORKLOAD_MIB:-256}" \
  --dirty "${DIRTY:-20}" --repeat "${REPEAT:-2}" --compress "${COMPRESS:-zstd:-1}"
