#!/usr/bin/env bash
# Runs ferry's test suite on this machine: installs QEMU and the build tools when
# missing, builds the test guest, then runs every crate's tests (the integration tests
# start real ferryd agents and real QEMU guests under TCG).
#
#   scripts/test.sh            default suite (about 15-20 minutes on 2 cores)
#   FERRY_LONG=1 scripts/test.sh   also the long suites: the handoff simulation with
#                                  10,000 seeded schedules, the whole failpoint x fault
#                                  matrix on real QEMU (writes target/fault-matrix.md), the
#                                  soak, and a short run of every fuzz target
#                                  (scripts/fuzz.sh, nightly; skipped without it)
set -euo pipefail
cd "$(dirname "$0")/.."

have_deps() {
  command -v qemu-system-x86_64 >/dev/null && command -v busybox >/dev/null && command -v cpio >/dev/null \
    && command -v chromedriver >/dev/null
}
if ! have_deps; then
  bash scripts/install-deps.sh
fi
bash scripts/build-guest.sh

# ferryd is built with its failpoints compiled in (inert unless FAILPOINTS is set): the
# fault tests arm them per agent process.
FEATURES=(--features ferry-agent/failpoints)
if [ "${FERRY_LONG:-0}" = 1 ]; then
  export FERRY_SIM_SCHEDULES=${FERRY_SIM_SCHEDULES:-10000}
fi
cargo build --workspace --all-targets "${FEATURES[@]}"
# Integration tests inside one binary serialise themselves (they share two cores);
# binaries run one after another.
cargo test --workspace --no-fail-fast "${FEATURES[@]}"
if [ "${FERRY_LONG:-0}" = 1 ]; then
  FERRY_FUZZ_RUNS=${FERRY_FUZZ_RUNS:-20000} bash scripts/fuzz.sh
fi
