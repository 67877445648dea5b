# shellcheck shell=bash
# Shared by run-example.sh and install-test-deps.sh (sourced, never run): become root,
# install Debian packages while another apt run holds the locks (as install.sh does), and
# make sure `python3 -m venv` works. Callers set PROG (their name, for messages).

# On a fresh cloud VM unattended-upgrades (or cloud-init) usually holds the apt/dpkg locks
# for minutes: wait for them this long instead of failing at once.
APT_LOCK_TIMEOUT=${APT_LOCK_TIMEOUT:-600}
APT_LOCK_POLL=${APT_LOCK_POLL:-5}

# Re-run the calling script as root: directly when root, through sudo when it exists, else
# one line saying how. The variables the scripts and the agent read go along (sudo drops them).
as_root() {
  [ "$(id -u)" = 0 ] && return 0
  if ! command -v sudo >/dev/null 2>&1; then
    echo "$PROG: needs root (podman runs rootful, as on a worker) and there is no sudo: run it as root, e.g. su -c '$0'" >&2
    exit 1
  fi
  local name keep=()
  for name in VENV DATA_DIR EXAMPLE_SUBNET CONTAINERS_CONF APT_LOCK_TIMEOUT $(compgen -e | grep '^TECHULUS_AGENT_' || true); do
    [ -n "${!name+set}" ] && keep+=("$name=${!name}")
  done
  echo "$PROG: not root; running it again with sudo"
  exec sudo -- env "${keep[@]}" "$0" "$@"
}

# The packages of "$@" that are not installed.
missing_packages() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$pkg"
  done
}

# The packages of "$@" that apt can install here (after apt_update): Ubuntu 22.04 has no
# netavark, for instance, and its podman uses CNI with the plugins it depends on.
available_packages() {
  local pkg
  for pkg in "$@"; do
    [ -n "$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ] && printf '%s\n' "$pkg"
  done
  return 0
}

# python3-venv when `python3 -m venv` cannot work (minimal Debian/Ubuntu lack ensurepip).
venv_package() {
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv
}

# `apt-get update`, retried while the lists lock is the reason: apt 2.6 applies
# DPkg::Lock::Timeout to the dpkg locks only, not to /var/lib/apt/lists/lock.
apt_update() {
  local deadline=$((SECONDS + APT_LOCK_TIMEOUT)) out said=0
  while :; do
    if out=$(LC_ALL=C apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" update -qq 2>&1); then
      return 0
    fi
    if ! grep -q 'Could not get lock' <<<"$out" || [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$out" >&2
      return 1
    fi
    if [ "$said" = 0 ]; then
      echo "$PROG: waiting for the apt lock (another apt run, e.g. unattended-upgrades; up to ${APT_LOCK_TIMEOUT}s)"
      said=1
    fi
    sleep "$APT_LOCK_POLL"
  done
}

# `apt-get install -y ARGS…`, waiting for the dpkg lock like apt_update does.
apt_install() {
  DEBIAN_FRONTEND=noninteractive LC_ALL=C apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" install -y -qq "$@" >/dev/null
}
