#!/usr/bin/env bash
# Installs (or removes) the Drover agent or controller on this host: binaries, systemd unit,
# example config, data directory and the `drover` system user; enrolls an agent with a token.
# Safe to run again: an existing config, data dir and enrollment are kept, so rerunning with
# newer binaries is the upgrade path. Run with --help for usage.
set -euo pipefail

readonly PROG=install.sh
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly script_dir

usage() {
  cat <<'EOF'
Usage: install.sh [--role agent|controller] [--controller ADDR --token TOKEN] [--bin-dir DIR]
                  [--no-start] [--dry-run] [--uninstall] [--help]

Installs Drover on this host: the binaries into /usr/local/bin, the systemd unit, the example
config into /etc/drover (never overwriting one that is there), the data dir under /var/lib and
the `drover` system user; enrolls the agent when given a token; enables and starts the unit.
Running it again is safe and is how to upgrade.

Options:
  --role agent|controller  what to install (default: agent)
  --controller ADDR        agent: the controller's address (host:port) to enroll with
  --token TOKEN            agent: one-time token from `drover token create` (with --controller);
                           skipped when this host is already enrolled; never printed
  --bin-dir DIR            where the built binaries are (default: target/release next to this
                           script if it exists, else this script's directory)
  --no-start               do not call systemctl (prints the commands to run instead)
  --dry-run                print every action as a `would: ` line and change nothing
  --uninstall              stop and disable the unit, remove it and the binaries; keeps
                           /etc/drover and the data dir
  -h, --help               print this help and exit

Environment:
  DESTDIR                  prefix for every installed path (staging, packaging). When set, no
                           user is created, nothing is chowned and systemctl is never called.

Exit status: 0 done, 1 failure, 2 bad usage.
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

usage_error() {
  printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2
  exit 2
}

say() { printf '%s\n' "$*"; }

warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

# --- arguments --------------------------------------------------------------------------------
role=agent
controller_addr=
token=
bin_dir=
dry_run=0
uninstall=0
no_start=0

# Value of an option given as `--opt VALUE`; a missing value or another option is bad usage
# (so `--token --dry-run` cannot take "--dry-run" for the token).
value_of() {
  if [ $# -lt 2 ] || [ -z "$2" ] || [[ $2 == -* ]]; then
    usage_error "$1 needs a value"
  fi
  printf '%s' "$2"
}

while [ $# -gt 0 ]; do
  case $1 in
    --role) role=$(value_of "$@"); shift 2 ;;
    --role=*) role=${1#*=}; shift ;;
    --controller) controller_addr=$(value_of "$@"); shift 2 ;;
    --controller=*) controller_addr=${1#*=}; shift ;;
    --token) token=$(value_of "$@"); shift 2 ;;
    --token=*) token=${1#*=}; shift ;;
    --bin-dir) bin_dir=$(value_of "$@"); shift 2 ;;
    --bin-dir=*) bin_dir=${1#*=}; shift ;;
    --no-start) no_start=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

case $role in
  agent | controller) ;;
  *) usage_error "--role must be agent or controller, not '$role'" ;;
esac
if [ -n "$controller_addr" ] || [ -n "$token" ]; then
  [ "$role" = agent ] || usage_error "--controller and --token are for --role agent"
  [ "$uninstall" = 0 ] || usage_error "--controller and --token cannot be used with --uninstall"
  [ -n "$controller_addr" ] || usage_error "--token needs --controller ADDR"
  [ -n "$token" ] || usage_error "--controller needs --token TOKEN"
fi

# --- what goes where --------------------------------------------------------------------------
destdir=${DESTDIR:-}
destdir=${destdir%/}
# Installing onto this very host (not staging into DESTDIR): the only case that creates the
# user, chowns and talks to systemd.
host_install=0
[ -n "$destdir" ] || host_install=1

if [ "$role" = agent ]; then
  binaries=(drover-agent)
else
  binaries=(drover-controller drover)
fi
unit=drover-$role.service
bin_target=$destdir/usr/local/bin
unit_target=$destdir/etc/systemd/system/$unit
conf_dir=$destdir/etc/drover
conf_target=$conf_dir/$role.toml
data_dir=$destdir/var/lib/drover-$role
unit_source=$script_dir/systemd/$unit
conf_source=$script_dir/systemd/$role.toml

if [ -z "$bin_dir" ]; then
  if [ -d "$script_dir/target/release" ]; then
    bin_dir=$script_dir/target/release
  else
    bin_dir=$script_dir
  fi
fi

# --- preconditions (checked before anything changes) ------------------------------------------
if [ "$host_install" = 1 ] && [ "$dry_run" = 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "must run as root to install onto this host (or set DESTDIR to stage into a directory)"
  needed=(install)
  [ "$no_start" = 1 ] || needed+=(systemctl)
  [ "$uninstall" = 1 ] || needed+=(useradd usermod)
  [ -z "$token" ] || needed+=(runuser)
  for cmd in "${needed[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found; this script needs a systemd-based Linux host"
  done
fi
if [ "$uninstall" = 0 ]; then
  for bin in "${binaries[@]}"; do
    if [ ! -f "$bin_dir/$bin" ] || [ ! -x "$bin_dir/$bin" ]; then
      die "binary not found: $bin_dir/$bin (run \`cargo build --release\` first, or pass --bin-dir DIR)"
    fi
  done
  for src in "$unit_source" "$conf_source"; do
    [ -f "$src" ] || die "missing $src (run install.sh from a Drover checkout or release)"
  done
fi

# --- actions ----------------------------------------------------------------------------------
# Runs a command, or under --dry-run prints it as a `would: ` line instead.
act() {
  if [ "$dry_run" = 1 ]; then
    say "would: $*"
  else
    "$@"
  fi
}

# Prints what was done; under --dry-run the `would: ` line already said it.
done_() {
  [ "$dry_run" = 1 ] || say "$*"
}

# Set when a binary, the unit or the enrollment changed: a running service is then restarted.
changed=0

# Creates a directory (and its parents) if missing; never touches an existing one.
ensure_dir() {
  local mode=$1 dir=$2
  [ -d "$dir" ] && return 0
  act install -d -m "$mode" "$dir"
}

# Installs SRC as DST with MODE unless DST already has that content and mode.
install_file() {
  local mode=$1 src=$2 dst=$3
  if [ -f "$dst" ] && cmp -s "$src" "$dst" && [ "$(stat -c %a "$dst")" = "${mode#0}" ]; then
    say "unchanged: $dst"
    return 0
  fi
  act install -m "$mode" "$src" "$dst"
  done_ "installed $dst (mode $mode)"
  changed=1
}

remove_file() {
  local path=$1
  if [ -e "$path" ] || [ -L "$path" ]; then
    act rm -f "$path"
    done_ "removed $path"
  else
    say "already absent: $path"
  fi
}

create_user() {
  if id drover >/dev/null 2>&1; then
    say "unchanged: system user drover exists"
  elif getent group drover >/dev/null 2>&1; then
    act useradd --system --no-create-home --shell /usr/sbin/nologin --gid drover drover
    done_ "created system user drover"
  else
    act useradd --system --no-create-home --shell /usr/sbin/nologin --user-group drover
    done_ "created system user drover"
  fi
  [ "$role" = agent ] || return 0
  if ! getent group docker >/dev/null 2>&1; then
    warn "no docker group yet: install Docker before starting the agent (the unit runs it with SupplementaryGroups=docker)"
  elif [[ " $(id -nG drover 2>/dev/null || true) " == *" docker "* ]]; then
    say "unchanged: drover is in the docker group"
  else
    act usermod -a -G docker drover
    done_ "added drover to the docker group (Docker-socket access is root-equivalent)"
  fi
}

# Runs `drover-agent enroll` once; a host that holds a certificate is already enrolled.
enroll() {
  local cert=$data_dir/identity/cert.pem
  if [ -f "$cert" ]; then
    say "already enrolled ($cert exists); skipping enrollment"
    return 0
  fi
  # The token travels in the environment (DROVER_TOKEN), not in argv, where `ps` would show it.
  local cmd=("$bin_target/drover-agent" enroll --controller "$controller_addr" --data-dir "$data_dir")
  # As the service user on a real host, so the identity files are created with the owner the
  # daemon runs as (the key is 0600). runuser without --login keeps the environment.
  [ "$host_install" = 0 ] || cmd=(runuser -u drover -- "${cmd[@]}")
  if [ "$dry_run" = 1 ]; then
    say "would: DROVER_TOKEN=<token redacted> ${cmd[*]}"
    return 0
  fi
  say "enrolling with the controller at $controller_addr"
  DROVER_TOKEN=$token "${cmd[@]}" || die "enrollment failed (see above); everything else is installed: rerun with a fresh token from \`drover token create\`"
  changed=1
}

start_unit() {
  local reload_start="systemctl daemon-reload && systemctl enable --now $unit"
  if [ "$host_install" = 0 ]; then
    say "DESTDIR is set, not calling systemctl; on the target host run: $reload_start"
    return 0
  fi
  if [ "$no_start" = 1 ]; then
    say "--no-start given, not calling systemctl; to start run: $reload_start"
    return 0
  fi
  # An agent without an identity exits at once (status 78); starting it would only fail.
  if [ "$role" = agent ] && [ -z "$token" ] && [ ! -f "$data_dir/identity/cert.pem" ]; then
    act systemctl daemon-reload
    say "not starting $unit: this host is not enrolled yet. Enroll it, then start the agent:"
    say "  runuser -u drover -- /usr/local/bin/drover-agent enroll --controller ADDR --token TOKEN"
    say "  systemctl enable --now $unit"
    say "(or rerun install.sh with --controller ADDR --token TOKEN)"
    return 0
  fi
  local was_active=0
  if systemctl is-active --quiet "$unit" 2>/dev/null; then
    was_active=1
  fi
  act systemctl daemon-reload
  act systemctl enable --now "$unit" || die "systemctl enable --now $unit failed; see: journalctl -u $unit"
  if [ "$was_active" = 1 ] && [ "$changed" = 1 ]; then
    act systemctl restart "$unit" || die "systemctl restart $unit failed; see: journalctl -u $unit"
    done_ "restarted $unit (it was running and something changed)"
  else
    done_ "enabled and started $unit"
  fi
}

do_install() {
  [ "$host_install" = 0 ] || create_user

  ensure_dir 0755 "$bin_target"
  for bin in "${binaries[@]}"; do
    install_file 0755 "$bin_dir/$bin" "$bin_target/$bin"
  done

  ensure_dir 0755 "$(dirname "$unit_target")"
  install_file 0644 "$unit_source" "$unit_target"

  # The operator's config is theirs: installed once, never overwritten.
  if [ -e "$conf_target" ]; then
    say "kept existing config $conf_target (not overwritten)"
  else
    ensure_dir 0755 "$conf_dir"
    local owner=()
    # Readable by the service (group drover), writable by root only.
    [ "$host_install" = 0 ] || owner=(-o root -g drover)
    act install -m 0640 "${owner[@]}" "$conf_source" "$conf_target"
    done_ "installed $conf_target (mode 0640; edit it, it is never overwritten)"
  fi

  # App secrets (<app>.env, mode 0600) for deploys: private to the service user.
  if [ "$role" = agent ]; then
    local secrets=$conf_dir/secrets
    if [ -d "$secrets" ]; then
      say "kept secrets dir $secrets"
    else
      ensure_dir 0755 "$conf_dir"
      act install -d -m 0700 "$secrets"
      done_ "created $secrets (mode 0700: put each app's secrets in <app>.env there, mode 0600)"
    fi
    [ "$host_install" = 0 ] || act chown drover:drover "$secrets"
  fi

  # Holds the identity or CA key: private to the service user whatever was there before.
  if [ -d "$data_dir" ]; then
    if [ "$(stat -c %a "$data_dir")" != 700 ]; then
      act chmod 0700 "$data_dir"
    fi
    say "kept data dir $data_dir"
  else
    act install -d -m 0700 "$data_dir"
    done_ "created data dir $data_dir (mode 0700)"
  fi
  [ "$host_install" = 0 ] || act chown drover:drover "$data_dir"

  [ -z "$token" ] || enroll

  start_unit
  done_ "drover $role installed"
}

do_uninstall() {
  if [ "$host_install" = 1 ] && [ "$no_start" = 0 ]; then
    if [ -e "$unit_target" ]; then
      act systemctl disable --now "$unit" || die "systemctl disable --now $unit failed"
    fi
  elif [ "$host_install" = 0 ]; then
    say "DESTDIR is set, not calling systemctl"
  fi
  for bin in "${binaries[@]}"; do
    remove_file "$bin_target/$bin"
  done
  remove_file "$unit_target"
  if [ "$host_install" = 1 ] && [ "$no_start" = 0 ]; then
    act systemctl daemon-reload
  fi
  say "kept $conf_target and $data_dir (identity, keys and state); to remove them too:"
  say "  rm -rf $conf_target $data_dir"
  [ "$host_install" = 0 ] || say "the system user drover was kept (userdel drover removes it once no Drover service uses it)"
}

if [ "$uninstall" = 1 ]; then
  do_uninstall
else
  do_install
fi
