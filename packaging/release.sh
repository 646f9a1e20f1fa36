#!/usr/bin/env bash
# The release step: packaging/release.sh VERSION "change" ["change" ...]
#
# Sets VERSION in Cargo.toml (and Cargo.lock): the binary's --version and `status`, the .deb
# and the .rpm all take their version from there. Adds the entry for VERSION at the top of
# debian/changelog, the one changelog: the .deb ships it as its changelog, the .rpm as
# /usr/share/doc/secoda-agent/changelog (cargo-generate-rpm writes no %changelog). Then
# commit, and build with packaging/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -ge 2 ] || { echo "usage: $0 VERSION CHANGE [CHANGE ...]" >&2; exit 64; }
version=$1
shift
[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "$0: VERSION must be MAJOR.MINOR.PATCH, not '$version'" >&2; exit 64; }
current=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
if [ "$(printf '%s\n%s\n' "$current" "$version" | sort -V | tail -n1)" != "$version" ] || [ "$current" = "$version" ]; then
    echo "$0: VERSION $version is not newer than the current $current" >&2
    exit 64
fi

# The first `version =` in Cargo.toml is [package]'s.
sed -i "0,/^version = \".*\"$/s//version = \"$version\"/" Cargo.toml
cargo update --workspace --offline --quiet

entry=$(mktemp)
{
    echo "secoda-agent ($version-1) unstable; urgency=medium"
    echo
    for change in "$@"; do
        echo "  * $change"
    done
    echo
    echo " -- Secoda Engineering <engineering@secoda.co>  $(LC_ALL=C date -R)"
    echo
    cat debian/changelog
} > "$entry"
mv "$entry" debian/changelog
chmod 0644 debian/changelog
echo "version $current -> $version; debian/changelog:"
head -n 6 debian/changelog
