#!/usr/bin/env bash
# The agent's main job on one machine, without a control plane or any container registry:
#
#   scripts/run-example.sh [FILE]          reconcile from examples/hello.toml (or FILE) until Ctrl-C
#   scripts/run-example.sh --down [FILE]   remove what it made: containers, network, data dir, demo image
#
# Steps (one line each): Debian packages if missing (podman, netavark, busybox-static,
# python3-venv), a venv, the demo image localhost/techulus-example (built here from
# busybox-static: nothing is pulled), `agent doctor` (runs a throwaway container; where
# podman's defaults cannot run one, the example gets a containers.conf of its own in the
# data dir), then the agent in the foreground. As root; otherwise it re-runs itself with sudo. The container
# keeps running after Ctrl-C. Environment: VENV (default .venv), DATA_DIR (default
# /var/lib/techulus-agent-example), EXAMPLE_SUBNET (run the example on 10.200.N.0/24
# instead of the file's subnet), CONTAINERS_CONF and TECHULUS_AGENT_* pass through.
set -euo pipefail
PROG=run-example
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$here/scripts/lib.sh"
as_root "$@"

down=0
if [ "${1:-}" = "--down" ]; then
  down=1
  shift
fi
state=${1:-$here/examples/hello.toml}
venv=${VENV:-$here/.venv}
data_dir=${DATA_DIR:-/var/lib/techulus-agent-example}
image=localhost/techulus-example:latest
step_no=0
step() {
  step_no=$((step_no + 1))
  echo "$PROG: [$step_no/$1] $2"
}
agent() {
  # This checkout's code, whichever venv provides the dependencies.
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m agent "$@"
}

if [ -n "${EXAMPLE_SUBNET:-}" ]; then
  # The same example on another subnet (e.g. when 10.200.1.0/24 is taken): a copy in the data dir.
  if ! [[ "$EXAMPLE_SUBNET" =~ ^[0-9]+$ ]] || [ "$EXAMPLE_SUBNET" -lt 1 ] || [ "$EXAMPLE_SUBNET" -gt 255 ]; then
    echo "$PROG: EXAMPLE_SUBNET must be a number from 1 to 255, got '$EXAMPLE_SUBNET'" >&2
    exit 2
  fi
  copy="$data_dir/$(basename "${state%.*}")-subnet-$EXAMPLE_SUBNET.${state##*.}"
  if [ "$down" = 0 ] || [ ! -f "$copy" ]; then
    mkdir -p "$data_dir"
    chmod 700 "$data_dir"
    sed -E "s/^(subnetId *= *)[0-9]+/\\1$EXAMPLE_SUBNET/; s/10\\.200\\.[0-9]+\\./10.200.$EXAMPLE_SUBNET./g" "$state" >"$copy"
  fi
  state=$copy
fi

# A containers.conf an earlier run wrote because podman's defaults could not run containers.
own_conf=$data_dir/containers.conf
conf_copy=
if [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$own_conf" ]; then
  CONTAINERS_CONF=$own_conf
  if [ "$down" = 1 ]; then  # a copy: --down removes the data dir before the images
    conf_copy=$(mktemp)
    cp "$own_conf" "$conf_copy"
    CONTAINERS_CONF=$conf_copy
  fi
  export CONTAINERS_CONF
fi

# podman's defaults fail on some hosts (ulimits above the hard limits, a cgroup layout crun
# refuses, a CNI backend without plugins): settings that avoid all three, for the example only.
write_containers_conf() {
  local nofile nproc pid_max limits=()
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  # More processes than PIDs cannot exist, and some kernels refuse an nproc above pid_max.
  pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo unlimited)
  if [ "$pid_max" != unlimited ] && { [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; }; then
    nproc=$pid_max
  fi
  [ "$nofile" = unlimited ] || limits+=("\"nofile=$nofile:$nofile\"")
  [ "$nproc" = unlimited ] || limits+=("\"nproc=$nproc:$nproc\"")
  {
    echo "# Written by scripts/run-example.sh: podman's defaults could not run containers here."
    echo "[containers]"
    if [ "${#limits[@]}" -gt 0 ]; then (IFS=,; echo "default_ulimits = [${limits[*]}]"); fi
    echo "[engine]"
    echo 'cgroup_manager = "cgroupfs"'
    echo 'events_logger = "file"'
    if command -v runc >/dev/null; then echo 'runtime = "runc"'; fi
    if [ -x /usr/lib/podman/netavark ] || command -v netavark >/dev/null; then
      printf '[network]\nnetwork_backend = "netavark"\n'
    fi
  } >"$1"
}

if [ "$down" = 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "$PROG: no venv at $venv: nothing was started from this checkout" >&2
    exit 1
  fi
  step 2 "removing the containers, network and data dir of $state"
  agent standalone --down "$state" --data-dir "$data_dir" --purge
  step 2 "removing the demo images"
  for name in "$image" localhost/techulus-doctor-probe:latest; do
    if podman image exists "$name" 2>/dev/null && ! podman image rm "$name" >/dev/null; then
      echo "$PROG: kept image $name (a container still uses it)"
    fi
  done
  [ -z "$conf_copy" ] || rm -f "$conf_copy"
  echo "$PROG: done"
  exit 0
fi

total=5
mapfile -t missing < <(missing_packages podman netavark aardvark-dns busybox-static; venv_package)
if [ "${#missing[@]}" -gt 0 ]; then
  step $total "installing ${missing[*]}"
  apt_update
  mapfile -t missing < <(available_packages "${missing[@]}")
  apt_install --no-install-recommends "${missing[@]}"
else
  step $total "packages: podman, netavark, busybox-static and python3-venv are installed"
fi

if "$venv/bin/python" -c 'import urllib3, cryptography' >/dev/null 2>&1; then
  step $total "venv: $venv is ready"
else
  step $total "venv: creating $venv (pip install from PyPI)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e "$here"
fi

if podman image exists "$image"; then
  step $total "image: $image exists"
else
  step $total "image: building $image from busybox-static (nothing is pulled)"
  work=$(mktemp -d)
  mkdir -p "$work/rootfs/bin" "$work/rootfs/www" "$work/rootfs/tmp" "$work/rootfs/etc"
  cp /bin/busybox "$work/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/rootfs/bin/$applet"
  done
  echo "root:x:0:0:root:/:/bin/sh" >"$work/rootfs/etc/passwd"
  printf '<!doctype html>\n<title>Techulus agent</title>\n<h1>Hello from the Techulus agent</h1>\n<p>This page is served by a container the agent started from %s.</p>\n' \
    "$(basename "$state")" >"$work/rootfs/www/index.html"
  tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
  # sh as PID 1 with a TERM trap: `podman stop` returns at once instead of after its timeout.
  if ! out=$(podman import --change 'CMD ["/bin/sh","-c","trap \"exit 0\" TERM; httpd -f -p 80 -h /www & wait"]' \
    "$work/rootfs.tar" "$image" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "$PROG: podman import failed (see above); \`agent doctor $state\` names the usual causes" >&2
    exit 1
  fi
  rm -rf "$work"
fi

step $total "doctor: can this machine run the agent's containers?"
use_own_conf() {
  mkdir -p "$data_dir"
  chmod 700 "$data_dir"
  write_containers_conf "$own_conf"
  export CONTAINERS_CONF=$own_conf
  echo "$PROG: so the example uses its own $own_conf (ulimits, cgroupfs, runc, netavark)"
}
if [ -z "${CONTAINERS_CONF:-}" ] && [ "$(podman info --format '{{.Host.NetworkBackend}}' 2>/dev/null)" = cni ] \
  && ! ls /usr/lib/cni/bridge /usr/libexec/cni/bridge /opt/cni/bin/bridge /usr/local/lib/cni/bridge >/dev/null 2>&1; then
  # Checked before doctor runs: a network made under this backend could not even be removed.
  echo "$PROG: podman's network backend here is CNI without its plugins: it cannot run containers"
  use_own_conf
fi
status=0
report=$(agent doctor "$state" --data-dir "$data_dir" 2>&1) || status=$?
if [ "$status" != 0 ] && [ -z "${CONTAINERS_CONF:-}" ] && grep -q '^FAIL  container probe' <<<"$report"; then
  echo "$PROG: podman's defaults cannot run containers here: $(grep -m1 '^FAIL  container probe' <<<"$report" | cut -c 24-)"
  use_own_conf
  status=0
  report=$(agent doctor "$state" --data-dir "$data_dir" 2>&1) || status=$?
fi
if [ "$status" != 0 ]; then
  printf '%s\n' "$report" | grep -v ' INFO ' >&2
  echo "$PROG: agent doctor found a problem (the FAIL lines above say how to fix it)" >&2
  exit 1
fi

ip=$(grep -m1 -oE 'ipAddress"? *[:=] *"[0-9.]+' "$state" | grep -oE '[0-9]+(\.[0-9]+){3}' || true)
step $total "agent standalone $state${ip:+; try: curl http://$ip/} (Ctrl-C stops the agent, the container keeps running; remove everything: $0 --down)"
status=0
agent standalone "$state" --data-dir "$data_dir" || status=$?
echo "$PROG: the agent stopped (exit $status); its container keeps running. Remove everything it made: $0 --down"
exit "$status"
