#!/usr/bin/env bash
# Unpacks Debian bookworm's own QEMU 7.2 beside the installed 10.0 (from backports), into
# build/qemu72/, so tests can run one host of a mesh on 7.2 and keep rolling upgrades
# 7.2 <-> 10.0 tested (`../shared/notes/qemu-mechanics.md`). Prints the binary's path.
# Idempotent; needs apt (run `apt-get update` once on a fresh machine) and dpkg-deb.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/build/qemu72
BIN=$OUT/usr/bin/qemu-system-x86_64
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi
# The newest 7.2 build in bookworm proper (not backports, which carries 10.0).
version() {
  apt-cache madison "$1" | awk -F'|' '$2 ~ /7\.2\+dfsg/ && $3 ~ /bookworm\/main/ { gsub(/ /, "", $2); print $2; exit }'
}
V_X86=$(version qemu-system-x86)
V_COMMON=$(version qemu-system-common)
V_DATA=$(version qemu-system-data)
if [ -z "$V_X86" ] || [ -z "$V_COMMON" ] || [ -z "$V_DATA" ]; then
  apt-get update -qq
  V_X86=$(version qemu-system-x86); V_COMMON=$(version qemu-system-common); V_DATA=$(version qemu-system-data)
fi
[ -n "$V_X86" ] || { echo "install-qemu72: no QEMU 7.2 in apt's bookworm lists" >&2; exit 1; }
WORK=$OUT.work
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK" "$OUT"
(cd "$WORK" && apt-get download -q "qemu-system-x86=$V_X86" "qemu-system-common=$V_COMMON" "qemu-system-data=$V_DATA" >/dev/null)
for d in "$WORK"/*.deb; do dpkg-deb -x "$d" "$OUT"; done
rm -rf "$WORK"
# Firmware the 7.2 binary looks for relative to itself: the installed SeaBIOS and iPXE.
ln -sfn /usr/share/seabios "$OUT/usr/share/seabios"
mkdir -p "$OUT/usr/lib"
ln -sfn /usr/lib/ipxe "$OUT/usr/lib/ipxe"
"$BIN" --version | head -n1 >&2
echo "$BIN"
