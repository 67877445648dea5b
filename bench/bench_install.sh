#!/usr/bin/env bash
# bench_install.sh: prints the figures issue 5 asks for. Not a test: nothing is asserted.
#   - zipapp size (bin/agent-linux-amd64, -arm64)
#   - cold start (first run extracts under a fresh SHIV_ROOT) and warm start of
#     `bin/agent --version`, with every Python 3.10-3.12 found
#   - full install.sh run and idempotent second run in the nspawn end-to-end test
#     (skipped with --no-install; needs root, systemd-nspawn, debootstrap)
# Usage: bench/bench_install.sh [--no-install]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

OUT=$out/bin BUILD=$out/build "$here/build.sh" >/dev/null
printf 'zipapp size: amd64 %s bytes, arm64 %s bytes\n' "$(stat -c %s "$out/bin/agent-linux-amd64")" "$(stat -c %s "$out/bin/agent-linux-arm64")"

elapsed() {  # elapsed CMD...: wall seconds of one run (bash's microsecond clock)
  local start=${EPOCHREALTIME/[,.]/} end
  "$@" >/dev/null
  end=${EPOCHREALTIME/[,.]/}
  printf '%d.%06d' $(((end - start) / 1000000)) $(((end - start) % 1000000))
}

for v in 3.10 3.11 3.12; do
  # pyenv's real interpreters first (its shims on PATH fail for versions not selected).
  py=$(compgen -G "$HOME/.pyenv/versions/$v.*/bin/python$v" | head -n 1 || command -v "python$v" || true)
  [ -n "$py" ] || { echo "python$v: not installed"; continue; }
  root=$out/shiv-$v
  cold=$(SHIV_ROOT=$root elapsed "$py" "$out/bin/agent" --version)
  warm=()
  for _ in 1 2 3 4 5; do warm+=("$(SHIV_ROOT=$root elapsed "$py" "$out/bin/agent" --version)"); done
  best=$(printf '%s\n' "${warm[@]}" | sort -n | head -n 1)
  printf 'python%s: cold --version %.3fs, warm %.3fs (best of 5)\n' "$v" "$cold" "$best"
done

if [ "${1:-}" != "--no-install" ]; then
  echo "install.sh in nspawn (first run / second run):"
  "$here/.venv/bin/python" -m pytest -q -s tests/test_installer_e2e.py -p no:cacheprovider 2>&1 |
    grep -E '^(first|second) install.sh run:|^[0-9]+ (passed|failed)'
fi
