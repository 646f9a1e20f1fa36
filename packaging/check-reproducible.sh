#!/usr/bin/env bash
# Reproducible packages: builds the checked-out commit a second time, from a fresh clone at
# another path, and compares the result with target/packages/ (built earlier by
# packaging/build.sh from this checkout): the SHA256SUMS (four packages and the SBOM) must be
# the same, byte for byte. On a difference, diffoscope shows where (installed when missing).
# The cargo registry cache is shared; the target directory, the path and the time are not.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-reproducible: $*" >&2; exit 1; }

[ -f target/packages/SHA256SUMS ] || fail "no target/packages/SHA256SUMS: run packaging/build.sh first"
[ -z "$(git status --porcelain --untracked-files=no)" ] \
    || fail "the checkout has uncommitted changes; the packages must come from a commit"
commit=$(git rev-parse HEAD)
work=$(mktemp -d /var/tmp/secoda-rebuild.XXXXXX)
trap 'rm -rf "$work"' EXIT
other="$work/another/path/secoda-agent"
git clone -q --no-hardlinks "$PWD" "$other"
git -C "$other" checkout -q "$commit"
echo "check-reproducible: building $commit again in $other"
if ! (cd "$other" && packaging/build.sh) > "$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    fail "the second build failed"
fi
if diff -u target/packages/SHA256SUMS "$other/target/packages/SHA256SUMS" >&2; then
    echo "check-reproducible: the second build from $other is byte-identical:"
    cat target/packages/SHA256SUMS
    exit 0
fi
command -v diffoscope >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends diffoscope-minimal >/dev/null
}
while read -r _ file; do
    if ! cmp -s "target/packages/$file" "$other/target/packages/$file"; then
        echo "check-reproducible: $file differs; the first differences:" >&2
        diffoscope --text - "target/packages/$file" "$other/target/packages/$file" 2>&1 | head -n 80 >&2 || true
    fi
done < target/packages/SHA256SUMS
fail "two builds of $commit gave different packages (above)"
