#!/usr/bin/env bash
# README command one, measured: clones REPO at each COMMIT into a fresh directory, times the
# build given for it (the command one of that commit's README), and prints the compile units and the
# unstripped and stripped size of each program. Run `cargo fetch` first so the registry is
# warm: the download is not what is measured.
#
#   bench/command-one.sh REPO COMMIT 'BUILD COMMAND' [COMMIT 'BUILD COMMAND']...
#   bench/command-one.sh . e77c788 'cargo build --release --workspace --bins' HEAD 'cargo build --release'
set -euo pipefail

die() { printf 'command-one.sh: %s\n' "$*" >&2; exit 2; }
if [ $# -lt 3 ] || [ $(( ($# - 1) % 2 )) -ne 0 ]; then
  die "usage: $0 REPO COMMIT 'BUILD COMMAND' [COMMIT 'BUILD COMMAND']..."
fi
repo=$(cd "$1" && pwd)
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

while [ $# -gt 0 ]; do
  commit=$1 build=$2
  shift 2
  dir="$work/$commit"
  git clone -q "$repo" "$dir"
  git -C "$dir" checkout -q "$commit"
  start=$(date +%s.%N)
  if ! (cd "$dir" && bash -c "$build") >"$dir.log" 2>&1; then
    tail -20 "$dir.log" >&2
    die "$commit: '$build' failed"
  fi
  end=$(date +%s.%N)
  printf '%s: %s: %.0f s, %s compile units\n' "$commit" "$build" \
    "$(echo "$end - $start" | bc)" "$(grep -c Compiling "$dir.log")"
  for bin in drover drover-agent drover-controller; do
    path="$dir/target/release/$bin"
    strip -o "$work/$bin.stripped" "$path"
    printf '  %-18s unstripped %10s B  stripped %10s B\n' "$bin" \
      "$(stat -c %s "$path")" "$(stat -c %s "$work/$bin.stripped")"
  done
done
