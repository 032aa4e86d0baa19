#!/usr/bin/env bash
# RAM-size sweep: the same workload (512 MiB realistic mix, 50 MiB/s by default) in guests
# of 1, 2 and 4 GiB, ferry against QEMU on the same link; then a plot of downtime and
# total time against guest size (benches/plot_sweep.py).
#
#   benches/sweep.sh                                   wan, sizes 1024,2048,4096, 2 runs each
#   SIZES=1024,4096 PROFILE=dc REPEAT=1 benches/sweep.sh
#
# Environment: SIZES (MiB, comma list), PROFILE (wan), DIRTY (50), REPEAT (2), METHODS
# (default ferry-auto,ferry-zstd1,qemu-multifd-zstd,qemu-multifd-zstd-tls), OUT
# (benches/out/sweep-<profile>-<date>). Each size is one benches/compare.sh run in OUT/<size>;
# the plot and a combined table land in OUT. Exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-wan}
OUT=${OUT:-$PWD/benches/out/sweep-$PROFILE-$(date +%Y%m%d-%H%M%S)}
SIZES=${SIZES:-1024,2048,4096}
export PROFILE DIRTY=${DIRTY:-50} REPEAT=${REPEAT:-2}
export METHODS=${METHODS:-ferry-auto,ferry-zstd1,qemu-multifd-zstd,qemu-multifd-zstd-tls}
status=0
for size in ${SIZES//,/ }; do
  OUT=$OUT/$size GUEST_MIB=$size bash benches/compare.sh || status=1
done
/usr/bin/python3 benches/plot_sweep.py "$OUT" --sizes "$SIZES"
exit $status
