#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian/Ubuntu machine (as root, or
# re-run through sudo when packages are missing):
# the real tools of ../shared/TESTBED.md and a Python venv with the dev dependencies.
# Idempotent: a second run only checks.
set -euo pipefail
PROG=install-test-deps
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
venv=${VENV:-$here/.venv}

apt_packages=(
  podman netavark aardvark-dns runc crun catatonit busybox-static uidmap slirp4netns
  dnsmasq dnsutils caddy docker-registry iproute2 iptables git
  shellcheck systemd-container debootstrap
)
apt_norecommends=(wireguard-tools wireguard-go iputils-ping)

mapfile -t missing < <(missing_packages "${apt_packages[@]}" "${apt_norecommends[@]}"; venv_package)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root "$@"
  echo "$PROG: installing ${missing[*]}"
  apt_update
  venv_pkg=$(venv_package)
  apt_install "${apt_packages[@]}" ${venv_pkg:+"$venv_pkg"}
  apt_install --no-install-recommends "${apt_norecommends[@]}"
fi

if [ ! -x "$venv/bin/pytest" ] || [ "$here/pyproject.toml" -nt "$venv/.installed" ]; then
  echo "$PROG: preparing venv $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e "${here}[dev]"
  touch "$venv/.installed"
fi
