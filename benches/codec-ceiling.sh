#!/usr/bin/env bash
# How far compression alone can shrink the test guest's RAM: captures the guest's RAM with
# the benchmark's workload (scripts/capture-guest-ram.sh), keeps its non-zero pages (zero
# pages never travel), and runs zstd's own benchmark on them in 1 MiB independent blocks
# (ferry's batch) at several levels, up to 19 (far too slow to send with: the ceiling).
#
#   benches/codec-ceiling.sh                 levels 1 3 6 9 19, 1 GiB guest, 512 MiB at 20 MiB/s
#   LEVELS="1 3" RATE=50 benches/codec-ceiling.sh
#
# Environment: LEVELS, VM_MIB (1024), MEM_MIB (512), RATE (20), DIR (build/corpus-ceiling),
# KEEP=1 (keep DIR/nonzero.bin for more runs, e.g. `zstd -b1 --fast=2 -B1MiB DIR/nonzero.bin`).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-build/corpus-ceiling}
command -v zstd >/dev/null || apt-get install -y zstd >/dev/null
scripts/capture-guest-ram.sh --mix realistic --vm-mib "${VM_MIB:-1024}" --mem-mib "${MEM_MIB:-512}" \
  --rate "${RATE:-20}" --dirty-secs 3 "$DIR" >&2
python3 - "$DIR/guest-ram-realistic.bin" "$DIR/nonzero.bin" <<'PY'
import sys
zero = bytes(4096)
n = nz = 0
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as o:
    while page := f.read(4096):
        n += 1
        if page != zero:
            nz += 1
            o.write(page)
print(f"pages {n}, non-zero {nz} ({nz * 4096 / 2**20:.1f} MiB)")
PY
for l in ${LEVELS:-1 3 6 9 19}; do
  zstd -q -b"$l" -B1MiB -i1 "$DIR/nonzero.bin" 2>&1 | tr '\r' '\n' | tail -1
done
rm -f "$DIR/guest-ram-realistic.bin"
[ -n "${KEEP:-}" ] || rm -f "$DIR/nonzero.bin"
