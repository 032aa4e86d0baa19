#!/usr/bin/env bash
# Builds the ferry test guest into build/guest/:
#   vmlinuz             Debian 6.1 cloud kernel (linux-image-6.1.0-N-cloud-amd64-unsigned)
#   initramfs.cpio.gz   busybox-static + virtio modules + guest/init + static guest/workload.c
#   manifest.txt        key=value: kernel package and version, sha256 of both files
# Needs what scripts/install-deps.sh installs (apt, dpkg-deb, gcc + libc6-dev,
# busybox-static, cpio). Does nothing when the outputs are newer than every
# input; --force rebuilds. The kernel .deb is cached in build/guest/work/debs.
#
# Environment:
#   FERRY_KERNEL_PKG=<package>   use this kernel package instead of the newest 6.1 cloud one
#   FERRY_KERNEL_DEB=<file.deb>  use this already downloaded kernel package (no apt at all)
set -euo pipefail

usage() { echo "usage: $0 [--force]" >&2; exit 2; }
FORCE=0
for a in "$@"; do
  case "$a" in
    --force|-f) FORCE=1 ;;
    -h|--help) usage ;;
    *) echo "build-guest: unknown argument: $a" >&2; usage ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/build/guest
WORK=$OUT/work
log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# Modules for /init to insmod, in load order. REQUIRED ones must be present
# as modules or built into the kernel; the NIC ones are optional.
REQUIRED_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
OPTIONAL_MODULES="failover net_failover virtio_net"

# ---------------------------------------------------------------- inputs
busybox_bin() {
  dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'install ok installed' \
    || die "busybox-static is not installed (run scripts/install-deps.sh)"
  local p
  p=$(dpkg-query -L busybox-static | grep -E '/bin/busybox$' | head -n1)
  [ -n "$p" ] && [ -x "$p" ] || die "busybox-static installed but its binary was not found"
  echo "$p"
}
BUSYBOX=$(busybox_bin)
INPUTS=("$ROOT/guest/workload.c" "$ROOT/guest/init" "$ROOT/scripts/build-guest.sh" "$BUSYBOX")
[ -n "${FERRY_KERNEL_DEB:-}" ] && INPUTS+=("$FERRY_KERNEL_DEB")
for f in "${INPUTS[@]}"; do [ -f "$f" ] || die "missing input $f"; done

up_to_date() {
  local f
  for f in vmlinuz initramfs.cpio.gz manifest.txt; do [ -s "$OUT/$f" ] || return 1; done
  for f in "${INPUTS[@]}"; do [ "$OUT/manifest.txt" -nt "$f" ] || return 1; done
  if [ -n "${FERRY_KERNEL_PKG:-}" ]; then
    grep -qx "kernel_package=$FERRY_KERNEL_PKG" "$OUT/manifest.txt" || return 1
  fi
  return 0
}
if [ "$FORCE" = 0 ] && up_to_date; then
  log "up to date: $OUT ($(sed -n 's/^kernel_release=//p' "$OUT/manifest.txt"))"
  exit 0
fi

for t in dpkg-deb cpio gzip gcc sha256sum; do
  command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh)"
done
mkdir -p "$OUT" "$WORK/debs"

# ---------------------------------------------------------------- kernel package
has_candidate() {
  local c
  c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
  [ -n "$c" ] && [ "$c" != "(none)" ]
}

pick_kernel_pkg() {
  local p dep
  # Newest ABI first: linux-image-6.1.0-56-... before linux-image-6.1.0-55-...
  for p in $(apt-cache pkgnames linux-image-6.1 2>/dev/null \
               | grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64-unsigned$' | sort -rV); do
    if has_candidate "$p"; then echo "$p"; return 0; fi
  done
  # Fallback: what the cloud meta package depends on, unsigned flavour if there is one.
  dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
          | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\./ {print $2; exit}')
  if [ -n "$dep" ]; then
    if has_candidate "$dep-unsigned"; then echo "$dep-unsigned"; return 0; fi
    if has_candidate "$dep"; then echo "$dep"; return 0; fi
  fi
  return 1
}

apt_update() {
  [ "$(id -u)" = 0 ] || die "the apt package lists lack the kernel; run 'apt-get update' as root (or scripts/install-deps.sh)"
  log "apt-get update"
  apt-get update -qq
}

if [ -n "${FERRY_KERNEL_DEB:-}" ]; then
  DEB=$(cd "$(dirname "$FERRY_KERNEL_DEB")" && pwd)/$(basename "$FERRY_KERNEL_DEB")
  KPKG=$(dpkg-deb -f "$DEB" Package)
else
  if [ -n "${FERRY_KERNEL_PKG:-}" ]; then
    KPKG=$FERRY_KERNEL_PKG
    has_candidate "$KPKG" || { apt_update; has_candidate "$KPKG" || die "no apt candidate for $KPKG"; }
  else
    if [ -z "$(apt-cache pkgnames linux-image- 2>/dev/null | head -n1)" ]; then apt_update; fi
    KPKG=$(pick_kernel_pkg) || { apt_update; KPKG=$(pick_kernel_pkg) || die "no linux-image-6.1.*-cloud-amd64 package in apt"; }
  fi
  KVERSION=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2; exit}')
  # dpkg file names encode ':' in versions as %3a
  DEB=$(ls -1 "$WORK/debs/${KPKG}_${KVERSION/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$DEB" ]; then
    log "downloading $KPKG $KVERSION"
    APT_OPTS=()
    [ "$(id -u)" = 0 ] && APT_OPTS=(-o APT::Sandbox::User=root)
    (cd "$WORK/debs" && apt-get download -qq "${APT_OPTS[@]}" "$KPKG=$KVERSION") \
      || die "apt-get download $KPKG=$KVERSION failed"
    DEB=$(ls -1 "$WORK/debs/${KPKG}_${KVERSION/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$DEB" ] || die "downloaded package not found in $WORK/debs"
  else
    log "using cached $(basename "$DEB")"
  fi
fi
KVERSION=$(dpkg-deb -f "$DEB" Version)

log "extracting $(basename "$DEB")"
rm -rf "$WORK/kernel"
mkdir -p "$WORK/kernel"
dpkg-deb -x "$DEB" "$WORK/kernel"
VMLINUZ=$(ls -1 "$WORK/kernel/boot/"vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$VMLINUZ" ] || die "no boot/vmlinuz-* in $(basename "$DEB")"
KREL=${VMLINUZ##*/vmlinuz-}
KMODS=$WORK/kernel/lib/modules/$KREL
[ -d "$KMODS/kernel" ] || die "no lib/modules/$KREL/kernel in $(basename "$DEB")"

# ---------------------------------------------------------------- initramfs tree
STAGE=$WORK/root
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules/"$KREL"}

# busybox and its applet links
cp "$BUSYBOX" "$STAGE/bin/busybox"
chmod 755 "$STAGE/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
  case "$applet" in ""|bin/busybox|init|sbin/init|linuxrc) continue ;; esac
  mkdir -p "$STAGE/$(dirname "$applet")"
  [ -e "$STAGE/$applet" ] || ln -s /bin/busybox "$STAGE/$applet"
done

# modules: find each one, decompress to <name>.ko
module_file() {
  # kernel module file names may use '-' or '_' for the same module name
  local alt=${1//_/-}
  find "$KMODS/kernel" -type f \( -name "$1.ko" -o -name "$1.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n1
}
is_builtin() {
  [ -f "$KMODS/modules.builtin" ] && grep -Eq "/($1|${1//_/-})\.ko$" "$KMODS/modules.builtin"
}
install_module() {
  local src=$1 dst=$2
  case "$src" in
    *.ko)     cp "$src" "$dst" ;;
    *.ko.xz)  if command -v xz >/dev/null; then xz -dc "$src" >"$dst"
              else python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$src" >"$dst"; fi ;;
    *.ko.zst) command -v zstd >/dev/null || die "zstd is needed to unpack $src"
              zstd -qdc "$src" >"$dst" ;;
    *.ko.gz)  gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
}
SHIPPED=""
BUILTIN=""
for m in $REQUIRED_MODULES $OPTIONAL_MODULES; do
  f=$(module_file "$m")
  if [ -n "$f" ]; then
    install_module "$f" "$STAGE/lib/modules/$KREL/$m.ko"
    SHIPPED="$SHIPPED $m"
  elif is_builtin "$m"; then
    BUILTIN="$BUILTIN $m"
  elif [[ " $REQUIRED_MODULES " == *" $m "* ]]; then
    die "module $m is neither in $(basename "$DEB") nor built into $KREL"
  else
    log "optional module $m not found, skipped"
  fi
done
# Every dependency of a shipped module must be loaded before it (the order
# above is /init's insmod order) or be built in. Read from the .modinfo section.
module_deps() {
  local tmp
  if command -v objcopy >/dev/null; then
    tmp=$(mktemp)
    objcopy -O binary --only-section=.modinfo "$1" "$tmp" 2>/dev/null || true
    tr '\0' '\n' <"$tmp" | sed -n 's/^depends=//p' | tr ',' ' '
    rm -f "$tmp"
  else
    tr '\0' '\n' <"$1" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
  fi
}
LOADED="$BUILTIN"
for m in $SHIPPED; do
  for d in $(module_deps "$STAGE/lib/modules/$KREL/$m.ko"); do
    d=${d//-/_}
    [[ " $LOADED " == *" $d "* ]] || die "module $m needs $d, which is not loaded before it"
  done
  LOADED="$LOADED $m"
done

# workload and init
gcc -static -O2 -Wall -Wextra -s -o "$STAGE/workload" "$ROOT/guest/workload.c"
install -m 755 "$ROOT/guest/init" "$STAGE/init"
if [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$STAGE/dev/console" c 5 1
  mknod -m 666 "$STAGE/dev/null" c 1 3
fi
# /init reopens /dev/console after mounting devtmpfs, so non-root builds work too.

# ---------------------------------------------------------------- pack
find "$STAGE" -exec touch -h -d @1 {} +   # reproducible timestamps
(cd "$STAGE" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
   | cpio --null --quiet -o -H newc --reproducible -R 0:0) | gzip -9 -n >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"

{
  echo "kernel_package=$KPKG"
  echo "kernel_package_version=$KVERSION"
  echo "kernel_release=$KREL"
  echo "busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)"
  echo "modules_shipped=${SHIPPED# }"
  echo "modules_builtin=${BUILTIN# }"
  echo "vmlinuz_sha256=$(sha256sum "$OUT/vmlinuz" | cut -d' ' -f1)"
  echo "initramfs_sha256=$(sha256sum "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)"
} >"$OUT/manifest.txt.tmp"
mv "$OUT/manifest.txt.tmp" "$OUT/manifest.txt"
rm -rf "$STAGE" "$WORK/kernel"
log "built $OUT: kernel $KREL ($KPKG $KVERSION), initramfs $(stat -c %s "$OUT/initramfs.cpio.gz") bytes"
