#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k podman -x`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/install-test-deps.sh"
cd "$here"
exec "${VENV:-$here/.venv}/bin/python" -m pytest "$@"
