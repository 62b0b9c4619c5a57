#!/usr/bin/env bash
# Runs every Drover check on a fresh machine: installs what the tests need, then formatting,
# lints and the whole test suite (unit, end-to-end over real mTLS, real programs, install.sh,
# real PostgreSQL on the host and in a container).
# Under CI=true a missing prerequisite fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

# --- prerequisites ----------------------------------------------------------------------------
need_apt=()
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
# PostgreSQL for the backup tests: a server the harness starts in a temp dir, the client tools
# the agent runs, and debootstrap for the drover-postgres image.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_apt+=(postgresql)
command -v pg_dump >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
# age-keygen: the restore and validation tests read identity files it wrote.
command -v age-keygen >/dev/null 2>&1 || need_apt+=(age)
# docker-registry: a real registry on loopback that a fleet release's image pull downloads from.
[ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  elif [ "${CI:-}" = "true" ]; then
    die "missing ${need_apt[*]} and cannot install it (not root or no apt-get)"
  else
    log "warning: ${need_apt[*]} missing; tests that need it will skip with a reason"
  fi
fi
if ! docker version >/dev/null 2>&1; then
  if [ "${CI:-}" = "true" ]; then
    die "the Docker Engine is not reachable (docker version failed); the suite needs it under CI"
  fi
  log "warning: Docker Engine not reachable; Docker tests will skip with a reason"
fi

# --- checks -----------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked
if docker version >/dev/null 2>&1; then
  log "building the test app images (static binary, docker import)"
  scripts/testapp-image.sh
  log "building the PostgreSQL image (debootstrap, docker import; kept once built)"
  scripts/postgres-image.sh
fi
log "cargo test --workspace"
cargo test --workspace --locked -- --test-threads 2
