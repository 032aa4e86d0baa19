#!/usr/bin/env bash
# Installs the optional tools the testbed's measure.sh uses: iperf3 (throughput) and
# ping (RTT). Both are optional: measure.sh falls back to python3 without them.
# Debian packages only; idempotent: installs only what is missing.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install-tools.sh: run as root" >&2; exit 1; }

missing=()
command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-tools.sh: iperf3, ping and ip are already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# iperf3's package asks whether to start a daemon at boot: answer no.
echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-tools.sh: installed ${missing[*]}"
