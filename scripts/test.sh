#!/usr/bin/env bash
# Runs ferry's test suite on this machine: installs QEMU and the build tools when
# missing, builds the test guest, then runs every crate's tests (the integration tests
# start real ferryd agents and real QEMU guests under TCG).
#
#   scripts/test.sh            default suite (about 10-15 minutes on 2 cores)
#   FERRY_LONG=1 scripts/test.sh   also the long soak and fault suites (when present)
set -euo pipefail
cd "$(dirname "$0")/.."

have_deps() {
  command -v qemu-system-x86_64 >/dev/null && command -v busybox >/dev/null && command -v cpio >/dev/null
}
if ! have_deps; then
  bash scripts/install-deps.sh
fi
bash scripts/build-guest.sh

cargo build --workspace --all-targets
# Integration tests inside one binary serialise themselves (they share two cores);
# binaries run one after another.
cargo test --workspace --no-fail-fast
