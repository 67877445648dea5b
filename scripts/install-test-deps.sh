#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine (as root):
# the real tools of ../shared/TESTBED.md and a Python venv with the dev dependencies.
# Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}

apt_packages=(
  podman netavark aardvark-dns runc crun catatonit busybox-static uidmap slirp4netns
  dnsmasq dnsutils caddy docker-registry iproute2 iptables git
  shellcheck systemd-container debootstrap
)
apt_norecommends=(wireguard-tools wireguard-go iputils-ping)

missing=()
for pkg in "${apt_packages[@]}" "${apt_norecommends[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-test-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends "${apt_norecommends[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/pytest" ] || [ "$here/pyproject.toml" -nt "$venv/.installed" ]; then
  echo "install-test-deps: preparing venv $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "${here}[dev]"
  touch "$venv/.installed"
fi
