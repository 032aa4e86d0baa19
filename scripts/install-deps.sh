#!/usr/bin/env bash
# Installs what ferry needs on a Debian 12 (bookworm) host: QEMU 10.0 from the
# bookworm-backports suite, busybox-static (guest userland), and build tools.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root" >&2; exit 1; }; }
need_root

# Add bookworm-backports using the mirror this host's apt already uses for
# bookworm (no mirror host is hard-coded here).
add_backports() {
  local src=/etc/apt/sources.list.d/ferry-backports.sources
  [ -f "$src" ] && return 0
  local uris=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uris=$(awk '/^URIs:/{u=$2} /^Suites:/{ for(i=2;i<=NF;i++) if ($i=="bookworm") print u }' \
      /etc/apt/sources.list.d/debian.sources | head -n1)
  fi
  if [ -z "$uris" ] && [ -f /etc/apt/sources.list ]; then
    uris=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  if [ -z "$uris" ]; then
    echo "install-deps.sh: cannot find the bookworm mirror in apt's sources" >&2
    exit 1
  fi
  cat > "$src" <<SRC
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

add_backports
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq busybox-static cpio gcc libc6-dev iproute2 socat python3 >/dev/null
# The web console's browser test (crates/ferry-agent/tests/web_console.rs) drives
# headless Chromium through chromedriver.
apt-get install -y -qq chromium chromium-driver >/dev/null
qemu-system-x86_64 --version | head -n1
