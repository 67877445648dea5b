#!/usr/bin/env bash
# build.sh: turns a checkout into the files a user copies to servers, with one command:
#
#   bin/agent-linux-amd64, bin/agent-linux-arm64   shiv zipapps, one per CPU architecture
#   bin/agent                                      the same for this machine's architecture
#   bin/install.sh                                 install.sh with installer/ templates embedded
#   bin/SHA256SUMS                                 checksums of the above (install.sh checks them)
#   bin/agent-linux-*.sig, bin/release-signing.pub only with SIGNING_KEY (below)
#
# Signing: SIGNING_KEY=FILE (an Ed25519 private key in PEM, e.g. from
# `openssl genpkey -algorithm ed25519 -out release.pem`; needs OpenSSL 3) signs each zipapp
# with a detached signature (`<zipapp>.sig`, 64 raw bytes) and embeds the public key in
# bin/install.sh, which installs it as /etc/techulus-agent/release-signing.pub: from then on
# install.sh and `techulus-agent upgrade` refuse a build without a valid signature.
#
# Why several Pythons in one file: target servers ship Python 3.10 (Ubuntu 22.04), 3.11
# (Debian 12) and 3.12 (Ubuntu 24.04). cryptography's Rust core is abi3 (one .so for all),
# but it loads cffi's `_cffi_backend`, which is compiled per Python version. Its file names
# carry the version (`_cffi_backend.cpython-310-x86_64-linux-gnu.so`), so every version's
# build sits side by side in one site-packages and each interpreter picks its own.
#
# How: the lowest Python's wheels make the base site-packages (abi3 wheels built for the
# lowest version run on all later ones); each later Python only ADDS files that the base
# lacks (its own cffi extension). Versions are pinned in installer/zipapp-constraints.txt
# so the pure-Python halves match every extension. The version and git commit are stamped
# into a generated `agent/_build_info.py` inside the staging copy (never in the source tree).
#
# Environment: TOOLS_VENV (a venv with shiv), ARCHES ("amd64 arm64"), PY_VERSIONS ("3.10 3.11 3.12"), OUT (bin/), SIGNING_KEY,
# SOURCE_DATE_EPOCH (defaults to the commit time, which makes the zipapps reproducible).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

ARCHES=${ARCHES:-"amd64 arm64"}
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12"}
OUT=${OUT:-$here/bin}
BUILD=${BUILD:-$here/build/zipapp}
ENTRY_POINT=agent.cli:main
SHEBANG=/usr/bin/python3
CONSTRAINTS=$here/installer/zipapp-constraints.txt

die() { echo "build.sh: $*" >&2; exit 1; }
step() { echo "==> $*"; }

[ -f agent/cli.py ] || die "agent/cli.py is missing: the entry point $ENTRY_POINT cannot exist"
[ -f "$CONSTRAINTS" ] || die "$CONSTRAINTS is missing"
SIGNING_KEY=${SIGNING_KEY:-}
if [ -n "$SIGNING_KEY" ]; then
  [ -r "$SIGNING_KEY" ] || die "SIGNING_KEY $SIGNING_KEY cannot be read"
  openssl pkey -in "$SIGNING_KEY" -noout -text 2>/dev/null | grep -q '^ED25519 Private-Key' ||
    die "SIGNING_KEY $SIGNING_KEY is not an Ed25519 private key in PEM (openssl genpkey -algorithm ed25519)"
fi

# Tools: $TOOLS_VENV or the project venv when it has shiv, else a private one under build/.
if [ -n "${TOOLS_VENV:-}" ]; then
  tools=$TOOLS_VENV
elif [ -x "$here/.venv/bin/shiv" ]; then
  tools=$here/.venv
else
  tools=$here/build/tools-venv
  if [ ! -x "$tools/bin/shiv" ]; then
    step "creating build tools venv in $tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q -c "$CONSTRAINTS" "shiv>=1.0.6"
  fi
fi
pip=("$tools/bin/python" -m pip --disable-pip-version-check)

version=$("$tools/bin/python" -c 'import re,sys; print(re.search(r"__version__\s*=\s*\"([^\"]+)\"", open("agent/__init__.py").read()).group(1))')
commit=unknown
if git -C "$here" rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git -C "$here" rev-parse --short=12 HEAD)
  if [ -n "$(git -C "$here" status --porcelain -- agent pyproject.toml)" ]; then
    commit="$commit-dirty"
  fi
  : "${SOURCE_DATE_EPOCH:=$(git -C "$here" log -1 --format=%ct)}"
fi
: "${SOURCE_DATE_EPOCH:=315532800}"
export SOURCE_DATE_EPOCH
built=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

# Runtime dependencies straight from pyproject.toml (markers dropped: every Python gets the
# base set; tomli is only imported on 3.10).
mapfile -t deps < <("$tools/bin/python" - <<'PY'
import re
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
with open("pyproject.toml", "rb") as handle:
    for dep in tomllib.load(handle)["project"]["dependencies"]:
        print(re.split(r"\s*;", dep)[0].strip())
PY
)
[ "${#deps[@]}" -gt 0 ] || die "no dependencies found in pyproject.toml"

read -r -a versions <<<"$(tr ' ' '\n' <<<"$PY_VERSIONS" | grep . | sort -t. -k1,1n -k2,2n | tr '\n' ' ')"
base_version=${versions[0]}

machine_of() {
  case "$1" in
    amd64) echo x86_64 ;;
    arm64) echo aarch64 ;;
    *) die "unknown architecture $1 (want amd64 or arm64)" ;;
  esac
}

pip_target() {  # pip_target DIR ARCH PYVERSION PACKAGES...
  local dir=$1 arch=$2 pyver=$3 machine
  shift 3
  machine=$(machine_of "$arch")
  "${pip[@]}" install -q --no-compile --progress-bar off --no-warn-script-location --target "$dir" \
    --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform "manylinux2014_$machine" --platform "manylinux_2_17_$machine" --platform "manylinux_2_28_$machine" \
    -c "$CONSTRAINTS" "$@"
}

stage_agent() {  # the package source plus the generated stamp
  local site=$1
  mkdir -p "$site/agent"
  (cd agent && find . -name '__pycache__' -prune -o -name '_build_info.py' -prune -o -type f -print0 |
    xargs -0 -I{} cp --parents {} "$site/agent/")
  cat >"$site/agent/_build_info.py" <<EOF
"""Written by build.sh at build time; a source checkout has no such module."""

VERSION = "$version"
COMMIT = "$commit"
BUILT = "$built"
EOF
}

mkdir -p "$OUT"
for arch in $ARCHES; do
  step "building agent-linux-$arch (Python ${versions[*]})"
  site=$BUILD/$arch/site
  rm -rf "${BUILD:?}/$arch"
  mkdir -p "$site"
  pip_target "$site" "$arch" "$base_version" "${deps[@]}"
  for pyver in "${versions[@]:1}"; do
    extra=$BUILD/$arch/py$pyver
    # tomli is only needed below 3.11; leaving it out keeps compiled tomli builds away.
    mapfile -t later_deps < <(printf '%s\n' "${deps[@]}" | grep -v '^tomli')
    pip_target "$extra" "$arch" "$pyver" "${later_deps[@]}"
    # Only files the base lacks: the per-version extensions. abi3 and pure files stay the base's.
    (cd "$extra" && find . -type f -print0) | while IFS= read -r -d '' file; do
      [ -e "$site/$file" ] || { mkdir -p "$site/$(dirname "$file")"; cp -p "$extra/$file" "$site/$file"; }
    done
  done
  for pyver in "${versions[@]}"; do
    tag=${pyver/./}
    compgen -G "$site/_cffi_backend.cpython-$tag-*.so" >/dev/null ||
      die "no _cffi_backend for Python $pyver ($arch) in the staged site-packages"
  done
  rm -rf "${site:?}/bin"
  stage_agent "$site"
  "$tools/bin/shiv" --site-packages "$site" --reproducible --compressed \
    -e "$ENTRY_POINT" -p "$SHEBANG" -o "$OUT/agent-linux-$arch.tmp" >/dev/null
  mv -f "$OUT/agent-linux-$arch.tmp" "$OUT/agent-linux-$arch"
done

host_arch=$(uname -m)
case "$host_arch" in
  x86_64) host_arch=amd64 ;;
  aarch64) host_arch=arm64 ;;
esac
if [ -f "$OUT/agent-linux-$host_arch" ]; then
  cp -f "$OUT/agent-linux-$host_arch" "$OUT/agent.tmp" && mv -f "$OUT/agent.tmp" "$OUT/agent"
  step "bin/agent = agent-linux-$host_arch"
fi

# Signatures of an earlier signed build would not match this one.
rm -f "$OUT"/agent*.sig "$OUT/release-signing.pub"
templates=$here/installer
if [ -n "$SIGNING_KEY" ]; then
  step "signing with $SIGNING_KEY"
  openssl pkey -in "$SIGNING_KEY" -pubout -out "$OUT/release-signing.pub"
  for zipapp in "$OUT"/agent-linux-* "$OUT/agent"; do
    case "$zipapp" in *.sig | *.tmp) continue ;; esac
    [ -f "$zipapp" ] || continue
    openssl pkeyutl -sign -inkey "$SIGNING_KEY" -rawin -in "$zipapp" -out "$zipapp.sig"
    openssl pkeyutl -verify -pubin -inkey "$OUT/release-signing.pub" -rawin -in "$zipapp" -sigfile "$zipapp.sig" >/dev/null ||
      die "the signature of $zipapp does not verify"
  done
  # install.sh embeds every file of its template dir: the templates plus the public key.
  templates=$BUILD/templates
  rm -rf "$templates"
  cp -r "$here/installer" "$templates"
  cp "$OUT/release-signing.pub" "$templates/release-signing.pub"
fi

step "bin/install.sh (templates embedded)"
"$here/installer/embed.sh" "$here/install.sh" "$templates" >"$OUT/install.sh.tmp"
chmod 755 "$OUT/install.sh.tmp"
mv -f "$OUT/install.sh.tmp" "$OUT/install.sh"

(cd "$OUT" && sha256sum agent-linux-* install.sh >SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS)
step "done: version $version, commit $commit"
ls -l "$OUT"
