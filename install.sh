#!/usr/bin/env bash
# install.sh: turns a fresh Ubuntu 22.04/24.04 or Debian 12 server into a Techulus Cloud worker.
#
#   curl -fsSL https://<control-plane>/install.sh | sudo bash -s -- --url https://<control-plane> --token <token>
#
# It installs WireGuard, Podman, dnsmasq, git, Caddy (built with xcaddy and the Cloudflare DNS
# module), BuildKit's buildctl plus a BuildKit daemon (podman container `techulus-buildkit`,
# unit buildkit.service) on 127.0.0.1:1234 whose build steps get their own network, Railpack
# and the agent (a shiv zipapp), writes the systemd units, enables IP forwarding, starts
# everything and finishes with `techulus-agent doctor`. Run it again at any time: a second
# run changes nothing and says so; a run with a new agent binary upgrades it in place
# (atomic replace, agent restart without touching containers, old extraction dirs pruned).
#
# Where the templates come from (the single source is the repo's installer/ directory):
#   * from a checkout, `./install.sh` reads installer/<name> beside it;
#   * `build.sh` writes bin/install.sh, this same script with every template embedded as a
#     quoted heredoc in embedded_template(), so that the curl-piped copy needs nothing else.
#   A template found on disk wins over an embedded one (TECHULUS_TEMPLATE_DIR moves it).
#   Embedding (not fetching) keeps one download, one thing to checksum and no second URL.
#
# Order of work, so that a failure never leaves a half-installed server:
#   1. check the arguments and the OS, then 2. download and verify everything into a cache
#   dir (nothing on the system changes before all checksums match), then 3. apply, one
#   idempotent step at a time. Each file is replaced atomically, and only when it differs.
#   A failed step says what failed and where the log is; re-running resumes.
#
# Every download has a URL and a checksum that can be overridden (flags or TECHULUS_* env,
# see --help). The token reaches the agent through /etc/techulus-agent/agent.env (0600),
# never its command line; prefer TECHULUS_AGENT_TOKEN=… or --token-file over --token.
# Once the agent has registered (its keys exist), install.sh rewrites agent.env without
# the token, and later runs leave it out: a used one-time secret does not linger on disk.
#
# A re-run with a new agent build hands it to the installed agent's `techulus-agent upgrade`
# (agent/upgrade.py): the new build is kept only when it proves healthy within
# TECHULUS_UPGRADE_TIMEOUT seconds, otherwise the previous one runs again and install.sh
# fails saying why. When build.sh signed the release, this script carries its public key
# (template release-signing.pub), installs it, and accepts only an agent whose detached
# signature (<binary>.sig beside it) matches.
#
#   install.sh --uninstall [--purge [--yes]] [--purge-packages]
# removes what install.sh added for the agent (see do_uninstall); containers keep running
# unless --purge.
set -Eeuo pipefail
shopt -u patsub_replacement 2>/dev/null || true
umask 022

# ----------------------------------------------------------------------------------------
# Pinned versions and defaults (every one overridable by the environment).
GO_VERSION=${TECHULUS_GO_VERSION:-1.22.5}
XCADDY_VERSION=${TECHULUS_XCADDY_VERSION:-0.4.2}
CADDY_VERSION=${TECHULUS_CADDY_VERSION:-v2.8.4}
# The Cloudflare DNS module, pinned: unpinned, xcaddy takes its newest release, and the
# v0.2.x line needs libdns 1.x and Caddy >= 2.10, so the build of v2.8.4 would fail (or,
# after a Caddy bump, change under us). This pseudo-version is the module's commit of
# 2024-07-03 (89f16b99c18e): older than Caddy 2.9.0, so it cannot require more than
# 2.8.x, and widely built with Caddy 2.8.4/2.9.1 (e.g. NixOS `caddy.withPlugins` configs).
CADDY_CLOUDFLARE_VERSION=${TECHULUS_CADDY_CLOUDFLARE_VERSION:-v0.0.0-20240703190432-89f16b99c18e}
BUILDKIT_VERSION=${TECHULUS_BUILDKIT_VERSION:-v0.15.2}
# The Railpack CLI goes with the frontend image the agent builds with
# (ghcr.io/railwayapp/railpack-frontend:v0.15.4, PROTOCOL.md §13.4): the same release
# makes both (railpack's .goreleaser.yml), so plans and frontend agree.
RAILPACK_VERSION=${TECHULUS_RAILPACK_VERSION:-0.15.4}
# The BuildKit image by tag; TECHULUS_BUILDKIT_IMAGE_DIGEST=sha256:<hex> pins it to one
# exact image (podman then pulls by digest and refuses anything else).
BUILDKIT_IMAGE=${TECHULUS_BUILDKIT_IMAGE:-docker.io/moby/buildkit:$BUILDKIT_VERSION}
BUILDKIT_IMAGE_DIGEST=${TECHULUS_BUILDKIT_IMAGE_DIGEST:-}

OS_RELEASE=${TECHULUS_OS_RELEASE:-/etc/os-release}
LOG_FILE=${TECHULUS_INSTALL_LOG:-/var/log/techulus-agent-install.log}
CACHE_DIR=${TECHULUS_INSTALL_CACHE:-/var/cache/techulus-agent-install}

# Where things go on the server.
CONF_DIR=/etc/techulus-agent
DATA_DIR=/var/lib/techulus-agent
LIB_DIR=/usr/local/lib/techulus-agent
SHIV_ROOT_DIR=$DATA_DIR/shiv
AGENT_PYZ=$LIB_DIR/agent.pyz
UNIT_DIR=/etc/systemd/system

APT_PACKAGES=(wireguard-tools podman dnsmasq git curl ca-certificates python3 iproute2 iptables tar)
# On a fresh cloud VM unattended-upgrades (or cloud-init) usually holds the apt/dpkg locks
# for minutes: wait for them this long instead of failing at once.
APT_LOCK_TIMEOUT=600

# ----------------------------------------------------------------------------------------
# Output: one line per step on the terminal, everything else in the log file.
STEP_NO=0
STEP_TOTAL=0
CURRENT_STEP="starting"
CHANGED=0
declare -a CHANGES=()

say() { printf '%s\n' "$*"; }
log() {
  if [ -n "${LOG_READY:-}" ]; then printf '%s %s\n' "$(date -u +%FT%TZ)" "$*" >>"$LOG_FILE"; fi
}
die() {
  printf 'install.sh: error: %s\n' "$1" >&2
  [ $# -gt 1 ] && printf '  %s\n' "${@:2}" >&2
  log "ERROR: $*"
  exit 1
}
usage_error() {
  printf 'install.sh: %s\n' "$1" >&2
  printf "Run 'install.sh --help' for the options.\n" >&2
  exit 2
}
step() {
  STEP_NO=$((STEP_NO + 1))
  CURRENT_STEP=$1
  printf '[%d/%d] %s ... ' "$STEP_NO" "$STEP_TOTAL" "$1"
  log "=== step $STEP_NO/$STEP_TOTAL: $1"
}
step_done() { printf '%s\n' "${1:-ok}"; log "--- ${1:-ok}"; }
changed() { CHANGED=1; CHANGES+=("$1"); log "changed: $1"; }
run() {  # run CMD...: output to the log; on failure the caller's trap reports it.
  log "+ $*"
  "$@" >>"$LOG_FILE" 2>&1
}
on_error() {
  local code=$?
  trap - ERR
  printf 'FAILED\n' >&2
  printf '\ninstall.sh: step "%s" failed (exit %s).\n' "$CURRENT_STEP" "$code" >&2
  if [ -n "${LOG_READY:-}" ]; then
    printf 'Last lines of %s:\n' "$LOG_FILE" >&2
    tail -n 15 "$LOG_FILE" | sed 's/^/  | /' >&2
  fi
  printf 'Fix the cause and run the same command again: finished steps are skipped.\n' >&2
  exit "$code"
}

usage() {
  cat <<'EOF'
Usage: install.sh --url URL [options]
       install.sh --uninstall [--purge [--yes]] [--purge-packages]

Required:
  --url URL               control plane base URL (https://…)
Registration (first install only; a registered server ignores a token):
  --token TOKEN           one-time registration token. On the command line it is kept in
                          your shell history, sudo's log (auth.log/journal) and `ps`:
  --token-file FILE       safer: read the token from FILE (mode 600, e.g. written with an
                          editor; delete it afterwards), so it appears in no command line.
                          The environment variable TECHULUS_AGENT_TOKEN works too.
                          After registration install.sh removes the token from agent.env.
Options:
  --logs-endpoint URL     VictoriaLogs base URL for container and Caddy logs
  --registry HOST:PORT    insecure (plain HTTP) registry that BuildKit pushes to
  --cf-api-token TOKEN    Cloudflare API token for Caddy's DNS challenge (or env CF_API_TOKEN)
  --agent-binary FILE|URL the agent zipapp (default: <url>/agent/agent-linux-<arch>)
  --agent-sha256 HEX      its SHA-256 (default: from SHA256SUMS next to the URL)
  --agent-env KEY=VALUE   extra agent setting (TECHULUS_AGENT_*), repeatable
  --skip-build-tools      no BuildKit, buildctl, Railpack (server never builds images)
  --skip-caddy            no Caddy (server never serves public traffic)
  --download-only         download and verify everything into the cache, change nothing
  --render-only DIR       write the rendered config files under DIR as if DIR were /
                          (registered when DIR/var/lib/techulus-agent/keys/private.key exists)
  -h, --help              this text
Uninstalling:
  --uninstall             stop the agent and remove its unit, drop-ins, binaries (current,
                          previous), wrapper, env file and release key; containers keep running
  --purge                 with --uninstall: also the agent's containers, network and images
                          (only those it owns), its data dir (keys, volumes), and the Caddy and
                          BuildKit configuration install.sh wrote; asks first unless --yes
  --yes                   with --purge: do not ask
  --purge-packages        with --purge: also remove wireguard-tools, podman and dnsmasq (apt)
                          and the caddy, buildctl and railpack binaries install.sh put in
                          /usr/local/bin
Downloads (URL and SHA-256 of each can be overridden in the environment):
  TECHULUS_GO_URL / _SHA256, TECHULUS_XCADDY_URL / _SHA256, TECHULUS_BUILDKIT_URL / _SHA256,
  TECHULUS_RAILPACK_URL / _SHA256. Without a _SHA256 the checksum comes from the project's
  published checksum file (TECHULUS_<NAME>_SHA256_URL).
Versions: TECHULUS_GO_VERSION, TECHULUS_XCADDY_VERSION, TECHULUS_CADDY_VERSION,
  TECHULUS_CADDY_CLOUDFLARE_VERSION, TECHULUS_BUILDKIT_VERSION, TECHULUS_RAILPACK_VERSION.
BuildKit image: TECHULUS_BUILDKIT_IMAGE (default docker.io/moby/buildkit:<version>),
  TECHULUS_BUILDKIT_IMAGE_DIGEST=sha256:HEX to pin it to one exact image.
Upgrades: TECHULUS_UPGRADE_TIMEOUT (seconds a new agent has to prove healthy, default 90).
Other environment: TECHULUS_INSTALL_LOG (log file), TECHULUS_INSTALL_CACHE (download cache),
  TECHULUS_OS_RELEASE (os-release file), TECHULUS_TEMPLATE_DIR, TECHULUS_ARCH (amd64 or
  arm64: fetch or render for another CPU, only with --download-only or --render-only).
EOF
}

# ----------------------------------------------------------------------------------------
# Arguments.
URL=""
TOKEN=${TECHULUS_AGENT_TOKEN:-}
TOKEN_FILE=""
LOGS_ENDPOINT=""
REGISTRY=""
CF_API_TOKEN=${CF_API_TOKEN:-}
AGENT_BINARY=""
AGENT_SHA256=""
SKIP_BUILD=0
SKIP_CADDY=0
DOWNLOAD_ONLY=0
RENDER_DIR=""
UNINSTALL=0
PURGE=0
ASSUME_YES=0
PURGE_PACKAGES=0
UPGRADE_TIMEOUT=${TECHULUS_UPGRADE_TIMEOUT:-90}
declare -a AGENT_ENV=()

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --url) need_value "$@"; URL=$2; shift 2 ;;
    --token) need_value "$@"; TOKEN=$2; shift 2 ;;
    --token-file) need_value "$@"; TOKEN_FILE=$2; shift 2 ;;
    --logs-endpoint) need_value "$@"; LOGS_ENDPOINT=$2; shift 2 ;;
    --registry) need_value "$@"; REGISTRY=$2; shift 2 ;;
    --cf-api-token) need_value "$@"; CF_API_TOKEN=$2; shift 2 ;;
    --agent-binary) need_value "$@"; AGENT_BINARY=$2; shift 2 ;;
    --agent-sha256) need_value "$@"; AGENT_SHA256=$2; shift 2 ;;
    --agent-env) need_value "$@"; AGENT_ENV+=("$2"); shift 2 ;;
    --skip-build-tools) SKIP_BUILD=1; shift ;;
    --skip-caddy) SKIP_CADDY=1; shift ;;
    --download-only) DOWNLOAD_ONLY=1; shift ;;
    --render-only) need_value "$@"; RENDER_DIR=$2; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --yes) ASSUME_YES=1; shift ;;
    --purge-packages) PURGE_PACKAGES=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --*=*) usage_error "write '${1%%=*} ${1#*=}' (with a space), not '$1'" ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done

# Values end up in env files and config lines: allow only what those formats carry safely.
SAFE_URL_RE='^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/%+-]*)?$'
SAFE_TOKEN_RE='^[A-Za-z0-9._~+/=-]{8,512}$'
if [ "$UNINSTALL" = 0 ]; then
  [ "$PURGE$ASSUME_YES$PURGE_PACKAGES" = 000 ] || usage_error "--purge, --yes and --purge-packages go with --uninstall"
elif [ -n "$URL$TOKEN_FILE$AGENT_BINARY$RENDER_DIR" ] || [ "$DOWNLOAD_ONLY" = 1 ]; then
  usage_error "--uninstall takes only --purge, --yes and --purge-packages"
elif [ "$PURGE" = 0 ] && [ "$ASSUME_YES$PURGE_PACKAGES" != 00 ]; then
  usage_error "--yes and --purge-packages go with --purge (install.sh --uninstall --purge --yes)"
fi
if ! [[ $UPGRADE_TIMEOUT =~ ^[0-9]{1,4}$ ]] || [ "$UPGRADE_TIMEOUT" -lt 5 ]; then
  usage_error "TECHULUS_UPGRADE_TIMEOUT must be a number of seconds (5 to 9999)"
fi
if [ "$UNINSTALL" = 0 ]; then
  [ -n "$URL" ] || usage_error "--url is required (the control plane's base URL, e.g. --url https://cp.example.com)"
  [[ $URL =~ $SAFE_URL_RE ]] || usage_error "--url '$URL' is not an http(s) URL without query or spaces"
fi
URL=${URL%/}
if [ -n "$LOGS_ENDPOINT" ]; then
  [[ $LOGS_ENDPOINT =~ $SAFE_URL_RE ]] || usage_error "--logs-endpoint '$LOGS_ENDPOINT' is not an http(s) URL"
  LOGS_ENDPOINT=${LOGS_ENDPOINT%/}
fi
if [ -n "$TOKEN_FILE" ]; then
  [ -r "$TOKEN_FILE" ] || usage_error "--token-file $TOKEN_FILE cannot be read"
  TOKEN=$(tr -d ' \t\r\n' <"$TOKEN_FILE")
fi
if [ -n "$TOKEN" ] && ! [[ $TOKEN =~ $SAFE_TOKEN_RE ]]; then
  usage_error "the registration token has unexpected characters (expected letters, digits, ._~+/=-)"
fi
if [ -n "$CF_API_TOKEN" ] && ! [[ $CF_API_TOKEN =~ $SAFE_TOKEN_RE ]]; then
  usage_error "the Cloudflare API token has unexpected characters"
fi
if [ -n "$REGISTRY" ] && ! [[ $REGISTRY =~ ^[A-Za-z0-9.-]+:[0-9]{1,5}$ ]]; then
  usage_error "--registry '$REGISTRY' must look like HOST:PORT (e.g. 10.100.1.1:5000)"
fi
if [ -n "$AGENT_SHA256" ] && ! [[ $AGENT_SHA256 =~ ^[0-9a-fA-F]{64}$ ]]; then
  usage_error "--agent-sha256 must be 64 hex digits"
fi
for pair in "${AGENT_ENV[@]+"${AGENT_ENV[@]}"}"; do
  [[ $pair =~ ^TECHULUS_AGENT_[A-Z0-9_]+=[A-Za-z0-9._~:/@%+,=-]*$ ]] ||
    usage_error "--agent-env '$pair' must be TECHULUS_AGENT_NAME=value (value without spaces or quotes)"
done
if [ -n "$RENDER_DIR" ] && [ "$DOWNLOAD_ONLY" = 1 ]; then
  usage_error "--render-only and --download-only exclude each other"
fi
# Versions and the image end up in URLs and in the BuildKit unit's command line.
for pair in "GO_VERSION=$GO_VERSION" "XCADDY_VERSION=$XCADDY_VERSION" "CADDY_VERSION=$CADDY_VERSION" \
  "CADDY_CLOUDFLARE_VERSION=$CADDY_CLOUDFLARE_VERSION" "BUILDKIT_VERSION=$BUILDKIT_VERSION" \
  "RAILPACK_VERSION=$RAILPACK_VERSION"; do
  [[ ${pair#*=} =~ ^v?[0-9]+\.[0-9]+\.[0-9]+([.+-][0-9A-Za-z.-]+)?$ ]] ||
    usage_error "TECHULUS_${pair%%=*} '${pair#*=}' is not a version like 1.2.3"
done
if [ -n "$BUILDKIT_IMAGE_DIGEST" ]; then
  [[ $BUILDKIT_IMAGE_DIGEST =~ ^sha256:[0-9a-f]{64}$ ]] ||
    usage_error "TECHULUS_BUILDKIT_IMAGE_DIGEST must be sha256: and 64 lowercase hex digits"
  [[ $BUILDKIT_IMAGE != *@* ]] ||
    usage_error "TECHULUS_BUILDKIT_IMAGE already has a digest; do not also set TECHULUS_BUILDKIT_IMAGE_DIGEST"
  BUILDKIT_IMAGE=$BUILDKIT_IMAGE@$BUILDKIT_IMAGE_DIGEST
fi
[[ $BUILDKIT_IMAGE =~ ^[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)+(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?(@sha256:[0-9a-f]{64})?$ ]] ||
  usage_error "TECHULUS_BUILDKIT_IMAGE '$BUILDKIT_IMAGE' is not an image reference like docker.io/moby/buildkit:v0.15.2"
if [ -n "${TECHULUS_ARCH:-}" ]; then
  [[ $TECHULUS_ARCH =~ ^(amd64|arm64)$ ]] || usage_error "TECHULUS_ARCH must be amd64 or arm64"
  [ "$DOWNLOAD_ONLY" = 1 ] || [ -n "$RENDER_DIR" ] ||
    usage_error "TECHULUS_ARCH only goes with --download-only or --render-only (an install is for this machine's CPU)"
fi

# ----------------------------------------------------------------------------------------
# Templates: installer/<name> on disk, else the copy build.sh embedded below.
script_dir=""
if [ -n "${BASH_SOURCE[0]:-}" ] && [ -f "${BASH_SOURCE[0]}" ]; then
  script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi
TEMPLATE_DIR=${TECHULUS_TEMPLATE_DIR:-${script_dir:+$script_dir/installer}}

embedded_template() { return 1; }  # @@EMBEDDED_TEMPLATES@@ (build.sh replaces this line)

has_template() {
  { [ -n "$TEMPLATE_DIR" ] && [ -f "$TEMPLATE_DIR/$1" ]; } || embedded_template "$1" >/dev/null
}

template() {
  if [ -n "$TEMPLATE_DIR" ] && [ -f "$TEMPLATE_DIR/$1" ]; then
    cat "$TEMPLATE_DIR/$1"
  else
    embedded_template "$1" || die "template $1 is missing" \
      "Run install.sh from a checkout (it reads installer/) or use bin/install.sh made by build.sh."
  fi
}

declare -A VARS=()
render() {  # render TEMPLATE -> stdout, @NAME@ replaced by ${VARS[NAME]}
  local text key
  text=$(template "$1"; printf x) || return 1
  text=${text%x}
  for key in "${!VARS[@]}"; do
    text=${text//"@$key@"/"${VARS[$key]}"}
  done
  if [[ $text =~ @[A-Z][A-Z0-9_]*@ ]]; then
    die "template $1 uses ${BASH_REMATCH[0]}, which install.sh does not define"
  fi
  printf '%s' "$text"
}

# ----------------------------------------------------------------------------------------
# Platform.
ARCH=""
detect_arch() {
  case "${TECHULUS_ARCH:-$(uname -m)}" in
    x86_64 | amd64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) die "unsupported CPU architecture $(uname -m): only x86_64 (amd64) and aarch64 (arm64)" ;;
  esac
}

check_os() {
  [ -r "$OS_RELEASE" ] || die "cannot read $OS_RELEASE: is this a Linux with systemd?"
  local id version
  # shellcheck source=/dev/null
  id=$(. "$OS_RELEASE" && printf '%s' "${ID:-}")
  # shellcheck source=/dev/null
  version=$(. "$OS_RELEASE" && printf '%s' "${VERSION_ID:-}")
  case "$id:$version" in
    ubuntu:22.04 | ubuntu:24.04 | debian:12) ;;
    *) die "unsupported operating system '${id:-unknown} ${version:-?}'" \
      "Supported: Ubuntu 22.04, Ubuntu 24.04, Debian 12. Nothing was changed." ;;
  esac
}

existing_value() {  # existing_value FILE KEY: the single-quoted value install.sh wrote, or ""
  [ -r "$1" ] || return 0
  sed -n "s/^$2='\\([^']*\\)'\$/\\1/p" "$1" | head -n 1
}

is_registered() {  # the agent's signing key exists (under the --render-only root when rendering)
  [ -f "$RENDER_DIR$DATA_DIR/keys/private.key" ]
}

token_line() {  # agent.env's token line: the token until registration, then a note instead
  if [ -n "$TOKEN" ]; then
    printf "TECHULUS_AGENT_TOKEN='%s'" "$TOKEN"
  elif is_registered; then
    printf '# TECHULUS_AGENT_TOKEN: removed by install.sh, this server is registered (%s/keys).' "$DATA_DIR"
  else
    printf "TECHULUS_AGENT_TOKEN=''"
  fi
}

TOKEN_IGNORED=0
set_vars() {
  VARS[URL]=$URL
  # A registered server needs no token: it is left out of agent.env (and one given now is
  # not used). Before registration, a re-run without --token keeps the one installed.
  if is_registered; then
    [ -z "$TOKEN" ] || TOKEN_IGNORED=1
    TOKEN=""
  else
    [ -n "$TOKEN" ] || TOKEN=$(existing_value "$CONF_DIR/agent.env" TECHULUS_AGENT_TOKEN)
  fi
  # A re-run without --cf-api-token keeps the one installed, so that it changes nothing.
  [ -n "$CF_API_TOKEN" ] || CF_API_TOKEN=$(existing_value "$CONF_DIR/caddy.env" CF_API_TOKEN)
  VARS[TOKEN_LINE]=$(token_line)
  VARS[LOGS_ENDPOINT]=$LOGS_ENDPOINT
  VARS[CF_API_TOKEN]=$CF_API_TOKEN
  VARS[REGISTRY]=$REGISTRY
  VARS[REGISTRY_SECTION]="# No insecure registry given (install.sh --registry HOST:PORT adds one)."
  if [ -n "$REGISTRY" ]; then
    VARS[REGISTRY_SECTION]="# Builds push here over plain HTTP (install.sh --registry)."$'\n'"[registry.\"$REGISTRY\"]"$'\n'"  http = true"$'\n'"  insecure = true"
  fi
  VARS[LIB_DIR]=$LIB_DIR
  VARS[DATA_DIR]=$DATA_DIR
  VARS[CONF_DIR]=$CONF_DIR
  VARS[SHIV_ROOT]=$SHIV_ROOT_DIR
  VARS[AGENT_PYZ]=$AGENT_PYZ
  VARS[BUILDKIT_IMAGE]=$BUILDKIT_IMAGE
  local extra="" pair
  for pair in "${AGENT_ENV[@]+"${AGENT_ENV[@]}"}"; do
    extra+="${pair%%=*}='${pair#*=}'"$'\n'
  done
  VARS[AGENT_EXTRA_ENV]=$extra
}

# The rendered files: "template destination mode" (mode 600 for anything with a secret).
declare -a FILES=()
plan_files() {
  FILES=(
    "techulus-agent.service $UNIT_DIR/techulus-agent.service 644"
    "agent.env $CONF_DIR/agent.env 600"
    "techulus-agent $LIB_DIR/techulus-agent 755"
    "upgrade-guard $LIB_DIR/upgrade-guard 755"
    "99-techulus-forwarding.conf /etc/sysctl.d/99-techulus-forwarding.conf 644"
  )
  # Only a release signed by build.sh (SIGNING_KEY) has a key: agents must then be signed.
  if has_template release-signing.pub; then
    FILES+=("release-signing.pub $CONF_DIR/release-signing.pub 644")
  fi
  if [ "$SKIP_CADDY" = 0 ]; then
    FILES+=(
      "caddy.service $UNIT_DIR/caddy.service 644"
      "caddy.env $CONF_DIR/caddy.env 600"
      "Caddyfile /etc/caddy/Caddyfile 644"
    )
  fi
  if [ "$SKIP_BUILD" = 0 ]; then
    FILES+=(
      "buildkit.service $UNIT_DIR/buildkit.service 644"
      "buildkitd.toml /etc/buildkit/buildkitd.toml 644"
    )
  fi
}

# ----------------------------------------------------------------------------------------
# Downloads: URL + checksum each, into $CACHE_DIR, verified before anything is installed.
declare -A DL_URL=() DL_SHA=() DL_SHA_URL=() DL_FILE=()

plan_downloads() {
  local go_name="go$GO_VERSION.linux-$ARCH.tar.gz"
  local xc_name="xcaddy_${XCADDY_VERSION}_linux_$ARCH.tar.gz"
  local bk_name="buildkit-$BUILDKIT_VERSION.linux-$ARCH.tar.gz"
  # Railpack's release names (its .goreleaser.yml): x86_64-… and arm64-… (not aarch64).
  local rp_arch=x86_64
  [ "$ARCH" = arm64 ] && rp_arch=arm64
  local rp_name="railpack-v$RAILPACK_VERSION-$rp_arch-unknown-linux-musl.tar.gz"
  if [ "$SKIP_CADDY" = 0 ]; then
    add_download go "$go_name" "${TECHULUS_GO_URL:-https://go.dev/dl/$go_name}" \
      "${TECHULUS_GO_SHA256:-}" "${TECHULUS_GO_SHA256_URL:-https://go.dev/dl/$go_name.sha256}"
    add_download xcaddy "$xc_name" \
      "${TECHULUS_XCADDY_URL:-https://github.com/caddyserver/xcaddy/releases/download/v$XCADDY_VERSION/$xc_name}" \
      "${TECHULUS_XCADDY_SHA256:-}" \
      "${TECHULUS_XCADDY_SHA256_URL:-https://github.com/caddyserver/xcaddy/releases/download/v$XCADDY_VERSION/xcaddy_${XCADDY_VERSION}_checksums.txt}"
  fi
  if [ "$SKIP_BUILD" = 0 ]; then
    add_download buildkit "$bk_name" \
      "${TECHULUS_BUILDKIT_URL:-https://github.com/moby/buildkit/releases/download/$BUILDKIT_VERSION/$bk_name}" \
      "${TECHULUS_BUILDKIT_SHA256:-}" \
      "${TECHULUS_BUILDKIT_SHA256_URL:-https://github.com/moby/buildkit/releases/download/$BUILDKIT_VERSION/$bk_name.sha256}"
    add_download railpack "$rp_name" \
      "${TECHULUS_RAILPACK_URL:-https://github.com/railwayapp/railpack/releases/download/v$RAILPACK_VERSION/$rp_name}" \
      "${TECHULUS_RAILPACK_SHA256:-}" \
      "${TECHULUS_RAILPACK_SHA256_URL:-https://github.com/railwayapp/railpack/releases/download/v$RAILPACK_VERSION/checksums.txt}"
  fi
  # The agent: a local file, or a URL (default: the control plane's /agent/ directory).
  local agent_url=${AGENT_BINARY:-$URL/agent/agent-linux-$ARCH}
  if [[ $agent_url =~ ^https?:// ]]; then
    add_download agent "agent-linux-$ARCH" "$agent_url" "$AGENT_SHA256" "${agent_url%/*}/SHA256SUMS"
  else
    [ -f "$agent_url" ] || die "--agent-binary $agent_url: no such file"
    DL_FILE[agent]=$agent_url
    DL_SHA[agent]=$AGENT_SHA256
  fi
  if has_template release-signing.pub; then
    AGENT_SIG=${DL_FILE[agent]}.sig
    if [[ $agent_url =~ ^https?:// ]]; then AGENT_SIG_URL=$agent_url.sig; fi
  fi
}

AGENT_SIG=""
AGENT_SIG_URL=""
verify_agent_signature() {  # this release is signed: the agent binary must carry a good signature
  [ -n "$AGENT_SIG" ] || return 0
  if [ -n "$AGENT_SIG_URL" ]; then
    fetch "$AGENT_SIG_URL" "$AGENT_SIG" ||
      die "cannot download the agent's signature from $AGENT_SIG_URL" \
        "This install.sh carries a release key, so it installs only signed agents. Nothing was installed."
  fi
  [ -f "$AGENT_SIG" ] || die "the agent binary has no signature $AGENT_SIG" \
    "This install.sh carries a release key, so it installs only signed agents (build.sh SIGNING_KEY=…). Nothing was installed."
  command -v openssl >/dev/null 2>&1 || die "openssl is missing (it checks the agent's signature): apt-get install -y openssl"
  local key
  key=$(mktemp)
  template release-signing.pub >"$key"
  if ! openssl pkeyutl -verify -pubin -inkey "$key" -rawin -in "${DL_FILE[agent]}" -sigfile "$AGENT_SIG" >>"$LOG_FILE" 2>&1; then
    rm -f "$key"
    die "the signature of the agent binary ${DL_FILE[agent]} does not match this release's key" \
      "Nothing was installed. The file was corrupted or tampered with, or belongs to another release."
  fi
  rm -f "$key"
}

add_download() {  # add_download KEY FILENAME URL SHA256 SHA256_URL
  [[ $3 =~ ^(https?|file):// ]] || die "download URL for $1 '$3' must be http(s):// or file://"
  if [ -n "$4" ] && ! [[ $4 =~ ^[0-9a-fA-F]{64}$ ]]; then
    die "the SHA-256 given for $1 is not 64 hex digits"
  fi
  DL_URL[$1]=$3
  DL_SHA[$1]=${4,,}
  DL_SHA_URL[$1]=$5
  DL_FILE[$1]=$CACHE_DIR/$2
}

fetch() {  # fetch URL DEST: curl with retries and timeouts, into a temp name then renamed.
  local tmp="$2.part"
  if ! curl -fsSL --retry 3 --retry-delay 2 --connect-timeout 15 --max-time 900 -o "$tmp" "$1" >>"$LOG_FILE" 2>&1; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$2"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

expected_sha() {  # the checksum for KEY: given, or looked up in its checksum file
  local key=$1 name sums
  if [ -n "${DL_SHA[$key]}" ]; then
    printf '%s' "${DL_SHA[$key]}"
    return
  fi
  name=$(basename "${DL_FILE[$key]}")
  sums=$CACHE_DIR/$name.sha256sums
  fetch "${DL_SHA_URL[$key]}" "$sums" ||
    die "cannot download the checksum file for $key from ${DL_SHA_URL[$key]}" \
      "Check the network, or pass the checksum with TECHULUS_${key^^}_SHA256 (or --agent-sha256 for the agent)."
  # Formats: "HEX  NAME" lines (sha256sum, goreleaser) or a bare "HEX" (go.dev).
  local hex
  hex=$(awk -v n="$name" '($2 == n || $2 == "*" n) {print $1; exit}' "$sums")
  if [ -z "$hex" ] && [ "$(wc -w <"$sums")" = 1 ]; then
    hex=$(tr -d ' \n' <"$sums")
  fi
  [[ ${hex,,} =~ ^[0-9a-f]{64}$ ]] || die "the checksum file ${DL_SHA_URL[$key]} has no entry for $name"
  printf '%s' "${hex,,}"
}

download_all() {
  mkdir -p "$CACHE_DIR"
  chmod 700 "$CACHE_DIR"
  local key want got fetched=0
  for key in "${!DL_FILE[@]}"; do
    if [ -z "${DL_URL[$key]:-}" ]; then  # a local file: verify when a checksum was given
      if [ -n "${DL_SHA[$key]}" ] && [ "$(sha256_of "${DL_FILE[$key]}")" != "${DL_SHA[$key]}" ]; then
        die "checksum mismatch for ${DL_FILE[$key]}: expected ${DL_SHA[$key]}, got $(sha256_of "${DL_FILE[$key]}")" \
          "Nothing was installed. Check the file or the --agent-sha256 value."
      fi
      continue
    fi
    want=$(expected_sha "$key")
    if [ -f "${DL_FILE[$key]}" ] && [ "$(sha256_of "${DL_FILE[$key]}")" = "$want" ]; then
      continue  # cached from an earlier run
    fi
    fetch "${DL_URL[$key]}" "${DL_FILE[$key]}" ||
      die "cannot download $key from ${DL_URL[$key]}" \
        "Nothing was installed. Check the URL and the network (details in $LOG_FILE), then run the same command again."
    got=$(sha256_of "${DL_FILE[$key]}")
    if [ "$got" != "$want" ]; then
      rm -f "${DL_FILE[$key]}"
      die "checksum mismatch for $key (${DL_URL[$key]}): expected $want, got $got" \
        "The download was deleted and nothing was installed. If the URL is right, the file was corrupted or tampered with."
    fi
    fetched=$((fetched + 1))
  done
  DOWNLOADED=$fetched
  verify_agent_signature
}

# ----------------------------------------------------------------------------------------
# Idempotent file installation.
install_content() {  # install_content DEST MODE < content; atomic, only when different
  local dest=$1 mode=$2 tmp
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
  if ! { cat >"$tmp" && chmod "$mode" "$tmp"; }; then die "cannot write $tmp"; fi
  if [ -f "$dest" ] && cmp -s "$tmp" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$dest" || die "cannot replace $dest"
  changed "$dest"
  return 0
}

put() {  # put TEMPLATE DEST MODE: render, then install_content; 0 = changed, 1 = unchanged
  local tmp rc=0
  tmp=$(mktemp)
  if ! render "$1" >"$tmp"; then
    rm -f "$tmp"
    exit 1
  fi
  install_content "$2" "$3" <"$tmp" || rc=$?
  rm -f "$tmp"
  return "$rc"
}

install_binary() {  # install_binary SRC DEST: atomic, only when different
  local src=$1 dest=$2
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    return 1
  fi
  install_content "$dest" 755 <"$src"
}

# ----------------------------------------------------------------------------------------
# The steps.
CHANGED_UNITS=""
LEGACY_BUILDKIT=0

apt_get() {  # apt-get, waiting up to APT_LOCK_TIMEOUT s for the dpkg lock (DPkg::Lock::Timeout)
  # LC_ALL=C: apt_get_update reads apt's (otherwise translated) lock message.
  run env LC_ALL=C apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"
}

apt_get_update() {
  # `apt-get update` takes /var/lib/apt/lists/lock without waiting: apt 2.6 applies
  # DPkg::Lock::Timeout to the dpkg locks only (measured). So retry while the lock is the
  # reason, up to the same limit; any other failure stops at once.
  local deadline=$((SECONDS + APT_LOCK_TIMEOUT)) mark
  while :; do
    mark=$(wc -l <"$LOG_FILE")
    if apt_get update -q; then
      return 0
    fi
    if ! tail -n "+$((mark + 1))" "$LOG_FILE" | grep -q 'Could not get lock'; then
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "the apt lists lock was still held after ${APT_LOCK_TIMEOUT}s"
      return 1
    fi
    log "waiting for the apt lists lock (another apt run, e.g. unattended-upgrades)"
    sleep 5
  done
}

do_packages() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" = 0 ]; then
    step_done "already installed"
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_get_update
  apt_get install -y -q --no-install-recommends "${missing[@]}"
  changed "packages: ${missing[*]}"
  step_done "installed ${missing[*]}"
}

do_forwarding() {
  local conf=/etc/sysctl.d/99-techulus-forwarding.conf
  put 99-techulus-forwarding.conf "$conf" 644 || true
  if [ "$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null)" != 1 ]; then
    run sysctl -p "$conf" || die "cannot enable IP forwarding (sysctl -p $conf failed)" \
      "Containers would not be reachable over WireGuard. See $LOG_FILE."
    step_done "enabled"
  else
    step_done "on"
  fi
}

caddy_is_current() {  # the pinned Caddy with the pinned Cloudflare module (a new pin rebuilds)
  [ -x /usr/local/bin/caddy ] || return 1
  /usr/local/bin/caddy version 2>/dev/null | grep -q "^$CADDY_VERSION" || return 1
  /usr/local/bin/caddy list-modules 2>/dev/null | grep -q '^dns.providers.cloudflare' || return 1
  [ "$(/usr/local/bin/caddy build-info 2>/dev/null |
    awk '$1 == "dep" && $2 == "github.com/caddy-dns/cloudflare" {print $3; exit}')" = "$CADDY_CLOUDFLARE_VERSION" ]
}

do_caddy_build() {
  if caddy_is_current; then
    step_done "caddy $CADDY_VERSION with the Cloudflare module $CADDY_CLOUDFLARE_VERSION present"
    return
  fi
  local work
  work=$(mktemp -d "$CACHE_DIR/caddy-build.XXXXXX")
  run tar -C "$work" -xzf "${DL_FILE[go]}"
  run tar -C "$work" -xzf "${DL_FILE[xcaddy]}" xcaddy
  # xcaddy needs `go` on PATH; everything it writes stays in the work dir.
  run env PATH="$work/go/bin:$PATH" GOPATH="$work/gopath" GOCACHE="$work/gocache" GOFLAGS=-modcacherw \
    "$work/xcaddy" build "$CADDY_VERSION" --with "github.com/caddy-dns/cloudflare@$CADDY_CLOUDFLARE_VERSION" \
    --output "$work/caddy"
  "$work/caddy" list-modules 2>>"$LOG_FILE" | grep -q '^dns.providers.cloudflare' ||
    die "the Caddy built by xcaddy lacks dns.providers.cloudflare"
  install_binary "$work/caddy" /usr/local/bin/caddy || true
  rm -rf "$work"
  step_done "built caddy $CADDY_VERSION"
}

do_caddy_config() {
  if ! getent passwd caddy >/dev/null; then
    run useradd --system --home-dir /var/lib/caddy --create-home --shell /usr/sbin/nologin caddy
    changed "user caddy"
  fi
  install -d -o caddy -g caddy -m 755 /var/log/caddy /var/lib/caddy
  local n=0
  put Caddyfile /etc/caddy/Caddyfile 644 && n=1
  put caddy.env "$CONF_DIR/caddy.env" 600 && n=1
  put caddy.service "$UNIT_DIR/caddy.service" 644 && n=1
  [ "$n" = 1 ] && CHANGED_UNITS+=" caddy"
  [ -n "$CF_API_TOKEN" ] || say "(warning: no --cf-api-token: Caddy cannot get certificates until $CONF_DIR/caddy.env has CF_API_TOKEN)"
  step_done "$([ "$n" = 1 ] && echo written || echo unchanged)"
}

do_build_tools() {
  local work n=0
  work=$(mktemp -d "$CACHE_DIR/tools.XXXXXX")
  run tar -C "$work" -xzf "${DL_FILE[buildkit]}" bin/buildctl
  install_binary "$work/bin/buildctl" /usr/local/bin/buildctl && n=1
  run tar -C "$work" -xzf "${DL_FILE[railpack]}"
  local railpack
  railpack=$(find "$work" -type f -name railpack | head -n 1)
  [ -n "$railpack" ] || die "the Railpack archive ${DL_FILE[railpack]} holds no 'railpack' binary"
  install_binary "$railpack" /usr/local/bin/railpack && n=1
  rm -rf "$work"
  # Earlier versions of install.sh named the daemon's container plain "buildkit": remember to remove
  # that one (our own unit created it) before the renamed container starts.
  if [ -f "$UNIT_DIR/buildkit.service" ] && grep -q -- '--name buildkit ' "$UNIT_DIR/buildkit.service"; then
    LEGACY_BUILDKIT=1
  fi
  put buildkitd.toml /etc/buildkit/buildkitd.toml 644 && { n=1; CHANGED_UNITS+=" buildkit"; }
  put buildkit.service "$UNIT_DIR/buildkit.service" 644 && { n=1; CHANGED_UNITS+=" buildkit"; }
  step_done "$([ "$n" = 1 ] && echo installed || echo unchanged)"
}

current_build_id() {  # the shiv build id of a zipapp (names its extraction dir)
  python3 - "$1" <<'PY'
import json, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as archive:
    print(json.loads(archive.read("environment.json"))["build_id"])
PY
}

do_agent() {
  local src=${DL_FILE[agent]} n=0 build_id
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "the agent needs Python 3.10 or newer at /usr/bin/python3"
  build_id=$(current_build_id "$src" 2>>"$LOG_FILE") || die "$src is not an agent zipapp (no shiv environment.json)"
  install -d -m 700 "$DATA_DIR"
  install -d -m 755 "$LIB_DIR" "$CONF_DIR"
  if [ -f "$AGENT_PYZ" ] && cmp -s "$src" "$AGENT_PYZ"; then
    :
  elif agent_can_upgrade; then
    # The running agent's `upgrade` swaps it in (do_services) and keeps it only if healthy.
    UPGRADE_FROM=$src
    n=1
  else
    # First install, or an agent older than `upgrade`. Stage the new file under the final name in a sibling dir: shiv names its extraction
    # dir after the file name, so running the staged copy pre-extracts exactly the dir the
    # unit will use (first start is fast), and proves the file runs on this Python before
    # it replaces the old one. Then one rename on the same filesystem: atomic.
    local staging=$LIB_DIR/.staging
    rm -rf "$staging"
    install -d -m 700 "$staging"
    install -m 755 "$src" "$staging/agent.pyz"
    if ! run env SHIV_ROOT="$SHIV_ROOT_DIR" /usr/bin/python3 "$staging/agent.pyz" --version; then
      rm -rf "$staging"
      die "the agent binary $src does not start on $(python3 --version 2>&1)" "The installed agent was left as it was."
    fi
    if [ -f "$AGENT_PYZ" ]; then  # the running binary stays as `previous`, as `upgrade` keeps it
      ln -f "$AGENT_PYZ" "$staging/previous"
      mv -f "$staging/previous" "$AGENT_PYZ.previous"
    fi
    mv -f "$staging/agent.pyz" "$AGENT_PYZ"
    rm -rf "$staging"
    changed "$AGENT_PYZ"
    n=1
  fi
  put techulus-agent "$LIB_DIR/techulus-agent" 755 && n=1
  put upgrade-guard "$LIB_DIR/upgrade-guard" 755 && n=1
  ln -sfn "$LIB_DIR/techulus-agent" /usr/local/bin/techulus-agent
  put agent.env "$CONF_DIR/agent.env" 600 && n=1
  put techulus-agent.service "$UNIT_DIR/techulus-agent.service" 644 && n=1
  if has_template release-signing.pub; then
    put release-signing.pub "$CONF_DIR/release-signing.pub" 644 && n=1
  fi
  [ "$n" = 1 ] && CHANGED_UNITS+=" techulus-agent"
  AGENT_BUILD_ID=$build_id
  if [ -n "$UPGRADE_FROM" ]; then
    step_done "new build $build_id: upgraded when the services start"
  else
    step_done "$([ "$n" = 1 ] && echo "installed $("$LIB_DIR/techulus-agent" --version 2>/dev/null)" || echo unchanged)"
  fi
}

UPGRADE_FROM=""
agent_can_upgrade() {  # an installed agent with `upgrade`, under its unit: it can run the transaction
  [ -f "$AGENT_PYZ" ] && [ -f "$UNIT_DIR/techulus-agent.service" ] || return 1
  local help
  help=$(env SHIV_ROOT="$SHIV_ROOT_DIR" /usr/bin/python3 "$AGENT_PYZ" --help 2>>"$LOG_FILE") || return 1
  [[ $help == *"--binary"* ]]
}

upgrade_agent() {  # the installed agent swaps in UPGRADE_FROM, watches it, commits or rolls back
  local args=(upgrade --binary "$UPGRADE_FROM" --sha256 "$(sha256_of "$UPGRADE_FROM")" --timeout "$UPGRADE_TIMEOUT")
  [ -n "$AGENT_SIG" ] && args+=(--signature "$AGENT_SIG")
  if run "$LIB_DIR/techulus-agent" "${args[@]}"; then
    changed "upgraded techulus-agent to build $AGENT_BUILD_ID"
    return 0
  fi
  local outcome
  outcome=$(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["outcome"] + ": " + d["reason"])' \
    "$DATA_DIR/upgrade-state.json" 2>/dev/null) || outcome="see $LOG_FILE"
  die "the new agent was not kept ($outcome)" \
    "The previous agent runs again and no container was restarted. Why: journalctl -u techulus-agent -n 50"
}

ensure_service() {  # ensure_service NAME: enabled, running; restarted only when its files changed
  local name=$1
  if ! systemctl is-enabled --quiet "$name" 2>/dev/null; then
    run systemctl enable "$name"
    changed "enabled $name"
  fi
  if [ "$name" = techulus-agent ] && [ -n "$UPGRADE_FROM" ]; then
    upgrade_agent  # it restarts the unit (after the daemon-reload above), or rolls back
  elif [[ " $CHANGED_UNITS " == *" $name "* ]]; then
    # Agent: KillMode=process in its unit, so this restart leaves every container running.
    run systemctl restart "$name"
    changed "restarted $name"
  else
    # "activating" covers a unit waiting to be restarted by systemd: nothing to do here.
    case "$(systemctl is-active "$name" 2>/dev/null)" in
      active | activating | reloading) ;;
      *)
        run systemctl start "$name"
        changed "started $name"
        ;;
    esac
  fi
}

do_services() {
  if [[ -n ${CHANGED_UNITS// /} ]]; then
    run systemctl daemon-reload
  fi
  # Containers run with --restart=always; podman-restart brings them back at boot, before
  # the agent (or the control plane) is reachable. Enabled only: starting it now is not needed.
  if systemctl cat podman-restart.service >/dev/null 2>&1 && ! systemctl is-enabled --quiet podman-restart 2>/dev/null; then
    run systemctl enable podman-restart
    changed "enabled podman-restart"
  fi
  if [ "$LEGACY_BUILDKIT" = 1 ]; then
    # Stop the old unit's container "buildkit" (it holds 127.0.0.1:1234) and remove it;
    # the name is only touched here, where our own earlier unit is proof that it is ours.
    run systemctl stop buildkit || true
    run podman rm --force --ignore buildkit || true
    changed "removed the podman container buildkit (renamed techulus-buildkit)"
  fi
  local services=(dnsmasq)
  [ "$SKIP_BUILD" = 0 ] && services+=(buildkit)
  [ "$SKIP_CADDY" = 0 ] && services+=(caddy)
  services+=(techulus-agent)
  local name
  for name in "${services[@]}"; do
    ensure_service "$name"
  done
  # The agent reports READY only after registration: wait for that (Type=notify).
  local i
  for i in $(seq 1 60); do
    systemctl is-active --quiet techulus-agent && break
    [ "$i" = 60 ] && die "the agent did not become active" "See: journalctl -u techulus-agent -n 50"
    sleep 1
  done
  remove_used_token
  step_done "${services[*]} running"
}

remove_used_token() {
  # The agent is active, which it reports only once registered (Type=notify): the one-time
  # token is spent. Rewrite agent.env without it (everything else stays); the running agent
  # keeps its environment, so nothing is restarted.
  [ -n "$TOKEN" ] || return 0
  if ! is_registered; then
    log "the agent is active but $DATA_DIR/keys/private.key is missing: the token stays in agent.env"
    return 0
  fi
  TOKEN=""
  VARS[TOKEN_LINE]=$(token_line)
  put agent.env "$CONF_DIR/agent.env" 600 || true
  log "removed the registration token from $CONF_DIR/agent.env"
}

do_prune() {
  # Extraction dirs of earlier agent builds (shiv names them <file>_<build id>).
  local dir removed=0 previous_id=""
  # The previous build's extraction stays too: a rollback to it starts at once.
  [ -f "$AGENT_PYZ.previous" ] && previous_id=$(current_build_id "$AGENT_PYZ.previous" 2>>"$LOG_FILE" || true)
  for dir in "$SHIV_ROOT_DIR"/*_*; do
    [ -d "$dir" ] || continue
    case "$dir" in
      *"_$AGENT_BUILD_ID") continue ;;
    esac
    [ -n "$previous_id" ] && [[ $dir == *"_$previous_id" ]] && continue
    rm -rf -- "$dir" "$(dirname "$dir")/.$(basename "$dir")_lock"
    removed=$((removed + 1))
  done
  if [ "$removed" -gt 0 ]; then
    changed "pruned $removed old agent extraction dir(s)"
    step_done "removed $removed old extraction dir(s)"
  else
    step_done "nothing to prune"
  fi
}

start_run() {  # start_run MESSAGE: a supported OS, root, the log opened, failures reported
  check_os
  [ "$(id -u)" = 0 ] || die "install.sh must run as root (curl … | sudo bash -s -- …)"
  mkdir -p "$(dirname "$LOG_FILE")"
  : >>"$LOG_FILE"
  chmod 600 "$LOG_FILE"
  LOG_READY=1
  log "$1"
  trap on_error ERR
}

# ----------------------------------------------------------------------------------------
# Uninstall: what install.sh added, never anything it did not write.
ours() {  # ours FILE: a file install.sh wrote (each template names install.sh in its first lines)
  [ -f "$1" ] && head -n 3 "$1" | grep -q 'install\.sh'
}

remove_path() {  # remove_path PATH...: rm -rf, noted as a change when something was there
  local path
  for path in "$@"; do
    if [ -e "$path" ] || [ -L "$path" ]; then
      rm -rf -- "$path"
      changed "removed $path"
    fi
  done
}

stop_unit() {  # stop_unit NAME: disable and stop a unit install.sh wrote, then remove it and its drop-ins
  local name=$1
  ours "$UNIT_DIR/$name.service" || return 0
  run systemctl disable --now "$name" || log "systemctl disable --now $name failed; removing its unit anyway"
  remove_path "$UNIT_DIR/$name.service" "$UNIT_DIR/$name.service.d"
}

confirm_purge() {
  local answer=""
  if ! { exec 3</dev/tty; } 2>/dev/null; then
    die "--purge deletes $DATA_DIR (the server's keys, volumes) and the agent's containers, network and images" \
      "There is no terminal to ask on: add --yes to confirm. Nothing was changed."
  fi
  printf 'install.sh --purge deletes %s (keys, volumes) and the containers, network and images of this\n' "$DATA_DIR"
  printf 'server'"'"'s agent: its workloads stop for good. Type "purge" to go on: '
  read -r answer <&3 || true
  exec 3<&-
  [ "$answer" = purge ] || die "not confirmed; nothing was changed"
}

purge_workloads() {
  # The agent itself removes what it owns (its owner mark, through its Podman adapter),
  # with the settings it ran with; extracted into a temp dir, since the data dir goes.
  if [ ! -f "$AGENT_PYZ" ]; then
    say "(the agent binary is gone: containers cannot be proven the agent's, so none are removed)"
    remove_path "$DATA_DIR"
    return 0
  fi
  local extract status=0
  extract=$(mktemp -d)
  (
    set -a
    # shellcheck source=/dev/null
    [ -r "$CONF_DIR/agent.env" ] && . "$CONF_DIR/agent.env"
    set +a
    SHIV_ROOT=$extract
    export SHIV_ROOT
    exec /usr/bin/python3 "$AGENT_PYZ" purge --yes
  ) >>"$LOG_FILE" 2>&1 || status=$?
  rm -rf "$extract"
  [ "$status" = 0 ] || die "the agent could not remove its containers, network and images (exit $status)" \
    "Its unit is stopped; nothing else was removed. See $LOG_FILE, fix the cause and run the same command again."
  changed "removed the agent's containers, network, images and $DATA_DIR"
}

do_uninstall() {
  start_run "install.sh --uninstall started: purge=$PURGE purge_packages=$PURGE_PACKAGES"
  [ "$PURGE" = 1 ] && [ "$ASSUME_YES" = 0 ] && confirm_purge
  STEP_TOTAL=$((2 + PURGE * 2 + PURGE_PACKAGES))
  say "Removing the Techulus Cloud agent (log: $LOG_FILE)"

  step "Stopping the agent (containers keep running)"
  # KillMode=process: stopping signals the agent alone, never conmon or a container.
  stop_unit techulus-agent
  step_done

  if [ "$PURGE" = 1 ]; then
    step "Removing the agent's containers, network, images and data dir"
    purge_workloads
    step_done
    step "Removing the Caddy and BuildKit configuration"
    stop_unit caddy
    stop_unit buildkit
    # The daemon's container (our unit's --rm removes it on stop; a crash may leave it).
    if command -v podman >/dev/null 2>&1; then run podman rm --force --ignore techulus-buildkit || true; fi
    local file
    for file in /etc/caddy/Caddyfile "$CONF_DIR/caddy.env" /etc/buildkit/buildkitd.toml /etc/sysctl.d/99-techulus-forwarding.conf; do
      ours "$file" && remove_path "$file"
    done
    step_done
  fi

  step "Removing the agent's files"
  remove_path "$LIB_DIR" "$SHIV_ROOT_DIR" "$CACHE_DIR" "$CONF_DIR/agent.env" "$CONF_DIR/release-signing.pub"
  [ "$(readlink /usr/local/bin/techulus-agent 2>/dev/null)" = "$LIB_DIR/techulus-agent" ] && remove_path /usr/local/bin/techulus-agent
  rmdir "$CONF_DIR" 2>/dev/null || true
  run systemctl daemon-reload
  run systemctl reset-failed techulus-agent 2>/dev/null || true
  step_done

  if [ "$PURGE_PACKAGES" = 1 ]; then
    step "Removing packages (wireguard-tools podman dnsmasq) and /usr/local/bin/{caddy,buildctl,railpack}"
    local pkg present=()
    for pkg in wireguard-tools podman dnsmasq; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && present+=("$pkg")
    done
    if [ "${#present[@]}" -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt_get purge -y -q "${present[@]}"
      changed "purged packages: ${present[*]}"
    fi
    remove_path /usr/local/bin/caddy /usr/local/bin/buildctl /usr/local/bin/railpack
    step_done
  fi
  if [ "$CHANGED" = 0 ]; then
    say "Nothing to remove: the agent was not installed."
  elif [ "$PURGE" = 1 ]; then
    say "Done: the agent and everything it owned are gone."
  else
    say "Done: the agent is removed; its containers keep running and $DATA_DIR stays (install.sh again finds it)."
  fi
}

# ----------------------------------------------------------------------------------------
main() {
  if [ "$UNINSTALL" = 1 ]; then
    do_uninstall
    return
  fi
  detect_arch
  set_vars
  [ "$TOKEN_IGNORED" = 0 ] || say "(this server is already registered: the registration token was not used)"
  plan_files
  if [ -n "$RENDER_DIR" ]; then
    local spec name dest mode
    for spec in "${FILES[@]}"; do
      read -r name dest mode <<<"$spec"
      mkdir -p "$RENDER_DIR$(dirname "$dest")"
      render "$name" >"$RENDER_DIR$dest"
      chmod "$mode" "$RENDER_DIR$dest"
    done
    say "rendered ${#FILES[@]} files under $RENDER_DIR"
    return 0
  fi

  start_run "install.sh started: url=$URL arch=$ARCH skip_build=$SKIP_BUILD skip_caddy=$SKIP_CADDY"
  for tool in curl sha256sum tar python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      [ "$tool" = curl ] && die "curl is missing: apt-get install -y curl ca-certificates, then run again"
      [ "$tool" = python3 ] && die "python3 is missing: apt-get install -y python3, then run again"
      die "$tool is missing"
    fi
  done

  STEP_TOTAL=1
  [ "$DOWNLOAD_ONLY" = 0 ] && STEP_TOTAL=$((7 + (1 - SKIP_CADDY) * 2 + (1 - SKIP_BUILD)))
  say "Techulus Cloud worker setup (log: $LOG_FILE)"
  step "Downloading and verifying"
  plan_downloads
  DOWNLOADED=0
  download_all
  step_done "$([ "$DOWNLOADED" -gt 0 ] && echo "$DOWNLOADED fetched" || echo "all cached")"
  if [ "$DOWNLOAD_ONLY" = 1 ]; then
    say "Downloads verified in $CACHE_DIR; nothing else was changed."
    return 0
  fi
  [ -d /run/systemd/system ] || die "systemd is not running here: the worker needs systemd as PID 1"

  step "Installing packages (${APT_PACKAGES[*]})"
  do_packages
  step "Enabling IP forwarding"
  do_forwarding
  if [ "$SKIP_CADDY" = 0 ]; then
    step "Building Caddy with the Cloudflare DNS module"
    do_caddy_build
    step "Configuring Caddy"
    do_caddy_config
  fi
  if [ "$SKIP_BUILD" = 0 ]; then
    step "Installing BuildKit (buildctl, daemon unit) and Railpack"
    do_build_tools
  fi
  step "Installing the agent"
  do_agent
  step "Starting services"
  do_services
  step "Pruning old agent versions"
  do_prune
  step "Checking the server (techulus-agent doctor)"
  step_done
  local status=0
  "$LIB_DIR/techulus-agent" doctor 2>&1 | tee -a "$LOG_FILE" || status=${PIPESTATUS[0]}
  if [ "$CHANGED" = 0 ]; then
    say "Nothing changed: this server was already set up."
  else
    say "Done: ${#CHANGES[@]} change(s); details in $LOG_FILE."
  fi
  if [ "$status" != 0 ]; then
    say "install.sh: the agent is installed, but doctor found problems (above); fix them and run doctor again: techulus-agent doctor" >&2
    return "$status"
  fi
}

main
