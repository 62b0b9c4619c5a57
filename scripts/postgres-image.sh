#!/usr/bin/env bash
# Builds the image `drover-postgres:15` (PostgreSQL 15 on a Debian bookworm root made by
# debootstrap, imported with `docker import`: no registry is needed) for the backup tests.
# Built once and reused by tag: an image already carrying this script's recipe digest is kept.
# The Debian mirror is read from this machine's own apt sources (DROVER_DEBIAN_MIRROR overrides).
#
# The container initialises /var/lib/postgresql/data on first start (trust authentication on
# the local socket and 127.0.0.1, superuser `postgres`) and runs postgres as user postgres.
set -euo pipefail

image=drover-postgres:15
recipe=$(sha256sum "$0" | cut -c1-16)

log() { printf 'postgres-image.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# One build at a time: test binaries may ask for the image concurrently.
exec 9>/tmp/drover-postgres-image.lock
flock 9

have=$(docker image inspect --format '{{ index .Config.Labels "drover.postgres.recipe" }}' "$image" 2>/dev/null || true)
if [ "$have" = "$recipe" ]; then
  exit 0
fi

# The first bookworm (not -security, not -updates) mirror of the machine's apt sources, from
# one-line `deb URI SUITE ...` entries or deb822 `.sources` stanzas.
apt_mirror() {
  local file
  if [ -f /etc/apt/sources.list ]; then
    awk '$1 == "deb" {
           i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
           if ($(i + 1) == "bookworm") { print $i; exit }
         }' /etc/apt/sources.list
  fi
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    # Stanzas are separated by blank lines; keep the URIs of one whose Suites has bookworm.
    awk 'BEGIN { RS = ""; FS = "\n" }
         {
           uris = ""; ok = 0; deb = 0
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris); split(uris, u, " "); uris = u[1] }
             if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
             if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") ok = 1 }
           }
           if (deb && ok && uris != "") { print uris; exit }
         }' "$file"
  done
}

mirror=${DROVER_DEBIAN_MIRROR:-$(apt_mirror | head -n1)}
[ -n "$mirror" ] || die "no bookworm mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources; set DROVER_DEBIAN_MIRROR"

if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  else
    die "debootstrap is missing and cannot be installed (needs root and apt-get)"
  fi
fi

work=$(mktemp -d /var/tmp/drover-postgres-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
started=$(date +%s)
log "debootstrap bookworm from $mirror (takes about a minute)"
if ! debootstrap --variant=minbase --include=postgresql-15 bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi

# The package's own cluster and the downloaded packages are dead weight in the image.
rm -rf "$root/var/lib/postgresql/15" "$root/etc/postgresql/15" "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/lib/apt/lists/*

cat >"$root/usr/local/bin/drover-postgres-entrypoint" <<'EOF'
#!/bin/sh
# Initialises the data directory on first start, then runs postgres as user postgres.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/var/lib/postgresql/data
mkdir -p "$data" /run/postgresql
chown postgres:postgres "$data" /run/postgresql
chmod 0700 "$data"
if [ ! -s "$data/PG_VERSION" ]; then
  setpriv --reuid=postgres --regid=postgres --init-groups \
    "$bin/initdb" -D "$data" -U postgres -A trust --auth-local=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  echo "listen_addresses = '*'" >>"$data/postgresql.conf"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups "$bin/postgres" -D "$data" "$@"
EOF
chmod 0755 "$root/usr/local/bin/drover-postgres-entrypoint"

tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/drover-postgres-entrypoint"]' \
  --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'EXPOSE 5432' \
  --change "LABEL drover.postgres.recipe=$recipe" \
  - "$image" >/dev/null
log "built $image in $(($(date +%s) - started)) s"
