#!/usr/bin/env bash
# The agent's main job on one machine, no control plane: installs Podman and a venv if
# they are missing, then reconciles from examples/hello.toml (or the file given) until
# Ctrl-C. Run as root. The container keeps running after the agent stops.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
state=${1:-$here/examples/hello.toml}
venv=${VENV:-$here/.venv}
[ "$(id -u)" = 0 ] || { echo "run-example: run as root (podman runs rootful, like on a worker)" >&2; exit 1; }
if ! command -v podman >/dev/null; then
  echo "run-example: installing podman"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman >/dev/null
fi
if [ ! -x "$venv/bin/agent" ]; then
  echo "run-example: preparing $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e "$here"
fi
ip=$(grep -m1 -oE 'ipAddress"? *[:=] *"[0-9.]+' "$state" | grep -oE '[0-9]+(\.[0-9]+){3}' || true)
echo "run-example: reconciling from $state (Ctrl-C to stop)${ip:+; try: curl http://$ip/}"
exec "$venv/bin/agent" standalone "$state" --data-dir "${DATA_DIR:-/var/lib/techulus-agent-example}"
