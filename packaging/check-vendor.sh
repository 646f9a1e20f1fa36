#!/bin/sh
# The vendored russh (vendor/russh, used through Cargo's [patch]) must be exactly the released
# crate plus vendor/russh.patch: nothing else of russh's source may change unseen. Fetches the
# release from crates.io when cargo's cache does not have it (the [patch] means cargo never
# downloads it), checks its SHA-256 (the one crates.io publishes, formerly in Cargo.lock),
# applies the patch and compares the trees.
set -eu
cd "$(dirname "$0")/.."
VERSION=0.65.1
SHA256=94be3d86c71b9ed220a675c405e35c7a02565a009bf8da2e9cc13a700320a5c5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/russh-$VERSION.crate 2>/dev/null | head -n 1 || true)
if [ -z "$crate" ]; then
    crate="$work/russh-$VERSION.crate"
    curl -fsSL --retry 3 -o "$crate" "https://static.crates.io/crates/russh/russh-$VERSION.crate"
fi
echo "$SHA256  $crate" | sha256sum -c --quiet - || {
    echo "check-vendor: $crate is not russh $VERSION as published" >&2
    exit 1
}
tar -xzf "$crate" -C "$work"
(cd "$work/russh-$VERSION" && patch -s -p1 --no-backup-if-mismatch) < vendor/russh.patch
if ! diff -r "$work/russh-$VERSION" vendor/russh >"$work/diff"; then
    echo "check-vendor: vendor/russh is not russh $VERSION plus vendor/russh.patch:" >&2
    head -n 40 "$work/diff" >&2
    exit 1
fi
echo "check-vendor: vendor/russh = russh $VERSION (sha256 ${SHA256%"${SHA256#????????????}"}...) + vendor/russh.patch"
