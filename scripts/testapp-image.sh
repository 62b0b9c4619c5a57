#!/usr/bin/env bash
# Builds drover-testapp as a static binary and imports it into the local Docker Engine as
# images `drover-testapp:<tag>` (FROM-scratch style: the binary alone, via `docker import`),
# one per tag given (default: v1.0.0 v1.1.0 v2.0.0), each with APP_VERSION set to its tag.
# No registry is needed. Images already built from the same binary are kept (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

tags=("$@")
[ ${#tags[@]} -gt 0 ] || tags=(v1.0.0 v1.1.0 v2.0.0)
target_dir=target/testapp
triple=x86_64-unknown-linux-gnu

RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
  cargo build --quiet --release --locked -p drover-testapp --target "$triple"
bin=$target_dir/$triple/release/drover-testapp
if ! ldd "$bin" 2>&1 | grep -q 'not a dynamic executable\|statically linked'; then
  echo "testapp-image.sh: error: $bin is not statically linked" >&2
  exit 1
fi
digest=$(sha256sum "$bin" | cut -c1-16)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/app"
for tag in "${tags[@]}"; do
  image=drover-testapp:$tag
  have=$(docker image inspect --format '{{ index .Config.Labels "drover.testapp.binary" }}' "$image" 2>/dev/null || true)
  if [ "$have" = "$digest" ]; then
    continue
  fi
  tar -C "$work" -c app | docker import \
    --change 'ENTRYPOINT ["/app"]' \
    --change 'EXPOSE 8080' \
    --change "ENV APP_VERSION=$tag" \
    --change "LABEL drover.testapp.binary=$digest" \
    - "$image" >/dev/null
  echo "built $image"
done
