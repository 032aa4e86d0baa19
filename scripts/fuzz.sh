#!/usr/bin/env bash
# Runs ferry's cargo-fuzz targets (libFuzzer; needs the nightly toolchain) for a number
# of executions each and prints what each did. Installs cargo-fuzz when missing.
#
#   scripts/fuzz.sh              every target, FERRY_FUZZ_RUNS executions each (default 200000)
#   scripts/fuzz.sh frame_decoder   one target
#
# Where no nightly toolchain exists the suite says so and skips (exit 0): the targets
# are in fuzz/fuzz_targets/, the corpora they grow in fuzz/corpus/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${FERRY_FUZZ_RUNS:-200000}
TARGETS=(frame_decoder control_message page_batch_integrity nbd_tunnel cold_sidecar)
if [ $# -gt 0 ]; then TARGETS=("$@"); fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED: no nightly toolchain here (cargo +nightly); install one with rustup to run the fuzz suite"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --locked
fi
cd fuzz
cargo +nightly fuzz build -O >/dev/null
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  log=$(mktemp)
  # -max_total_time bounds a slow target; -runs is the figure reported.
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- -runs="$RUNS" -max_len=65536 \
      -max_total_time=600 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t FAILED (crash input under fuzz/artifacts/$t)"
    exit 1
  fi
  execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "fuzz: $t clean: ${execs:-?} executions in $(( $(date +%s) - start )) s (${cov:-cov: ?}, corpus $(ls "corpus/$t" | wc -l) inputs)"
  rm -f "$log"
done
