#!/usr/bin/env bash
# Builds the .deb and .rpm from a clean checkout into target/packages/.
set -euo pipefail
cd "$(dirname "$0")/.."

# The packaging tools, pinned (installed once per machine).
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@3.8.0
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm@0.21.1

cargo build --locked --release
mkdir -p target/man target/packages
for page in packaging/man/*.[0-9]; do
    gzip -9n -c "$page" > "target/man/$(basename "$page").gz"
done
cargo deb --no-build --output target/packages/
cargo generate-rpm --output target/packages/
ls -l target/packages/
