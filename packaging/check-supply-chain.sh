#!/usr/bin/env bash
# What a customer's security review asks of the dependencies (docs/installation.md "Verifying a release"):
#   1. the dependency policy (deny.toml): licences, duplicate versions, sources;
#   2. known advisories (RustSec) for Cargo.lock, offline against a dated copy of the database;
#   3. with the packages built (target/packages/, packaging/build.sh), for each of the four:
#      its binary carries the crate list (.dep-v0, cargo auditable) and it equals what
#      Cargo.lock resolves for that target (runtime and build time, no dev-dependency), the
#      SBOM lists the same crates, `cargo audit bin` finds no advisory in it, no build path
#      is left in it, and the licences it states (the .deb's copyright, the .rpm's License)
#      are deny.toml's allow-list.
#
#   packaging/check-supply-chain.sh              # 1 and 2
#   packaging/check-supply-chain.sh --packages   # 1, 2 and 3
#
# The advisory database: $RUSTSEC_ADVISORY_DB if set, else ../shared/rustsec-advisory-db beside
# the checkout (CI's dated copy), else the current database fetched by cargo-audit (a release
# machine with the network: RUSTSEC_ADVISORY_DB=fetch forces that).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY=0.20.2
CARGO_AUDIT=0.22.2
installed() { cargo install --list | grep -qx "$1 v$2:"; }
installed cargo-deny "$CARGO_DENY" || cargo install --locked "cargo-deny@$CARGO_DENY"
installed cargo-audit "$CARGO_AUDIT" || cargo install --locked "cargo-audit@$CARGO_AUDIT"

fail() { echo "check-supply-chain: $*" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The policy. --frozen: nothing is fetched or changed during the check itself.
cargo fetch --locked --quiet
cargo deny --frozen --log-level error check bans licenses sources \
    || fail "a dependency breaks deny.toml (the crate and the rule are named above)"
echo "check-supply-chain: deny.toml holds (licences, duplicate versions, sources)"

# 2. Advisories. The vendored russh is a path dependency, which cargo-audit skips; it is the
# released russh 0.65.1 plus vendor/russh.patch (packaging/check-vendor.sh), so it is audited
# as that release: a copy of Cargo.lock that names its registry source.
db=${RUSTSEC_ADVISORY_DB:-}
if [ -z "$db" ] && [ -d ../shared/rustsec-advisory-db/crates ]; then
    db=$(cd ../shared/rustsec-advisory-db && pwd)
fi
audit=(cargo audit --quiet)
if [ -n "$db" ] && [ "$db" != fetch ]; then
    [ -d "$db/crates" ] || fail "RUSTSEC_ADVISORY_DB=$db is not a RustSec advisory database"
    # A copy of the database carries no git history: --no-fetch, and --stale (its age is
    # printed below, not checked).
    audit+=(--db "$db" --no-fetch --stale)
    date=$(sed -n 's/^commit date: //p' "$db.SNAPSHOT" 2>/dev/null || true)
    [ -n "$date" ] || date=$(git -C "$db" log -1 --format=%cs 2>/dev/null || echo "an unknown date")
    source="the copy at $db"
else
    date=$(date -u +%F)
    source="the current database, fetched"
fi
python3 - Cargo.lock > "$work/Cargo.lock" <<'EOF'
import re, sys
lock = open(sys.argv[1]).read()
vendored = '[[package]]\nname = "russh"\nversion = "0.65.1"\n'
assert vendored in lock, "Cargo.lock: no path entry for russh 0.65.1"
print(lock.replace(vendored, vendored + 'source = "registry+https://github.com/rust-lang/crates.io-index"\n'), end="")
EOF
# Without a copy, the database is fetched from GitHub: a failure there is not an advisory.
fetch_hint=
[ "$source" = "the current database, fetched" ] && fetch_hint=", or the database could not be fetched (set RUSTSEC_ADVISORY_DB to a copy)"
"${audit[@]}" --file "$work/Cargo.lock" || fail "Cargo.lock has a known advisory (above): upgrade, or ignore it in .cargo/audit.toml with the reason$fetch_hint"
echo "check-supply-chain: Cargo.lock: no advisory known as of $date ($source; ignored with a written reason: $(grep -o 'RUSTSEC-[0-9-]*' .cargo/audit.toml | sort -u | tr '\n' ' '))"

[ "${1:-}" = --packages ] || exit 0

missing=()
for tool in rpm2cpio:rpm2cpio cpio:cpio strings:binutils dpkg-deb:dpkg rpm:rpm; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 3. The shipped binaries.
allowed=$(python3 -c 'import tomllib; print("\n".join(sorted(tomllib.load(open("deny.toml", "rb"))["licenses"]["allow"])))')
checked=0
for pkg in target/packages/*.deb target/packages/*.rpm; do
    [ -f "$pkg" ] || continue
    case "$pkg" in
        *amd64.deb | *x86_64.rpm) target=x86_64-unknown-linux-gnu ;;
        *arm64.deb | *aarch64.rpm) target=aarch64-unknown-linux-gnu ;;
        *) fail "$pkg: which architecture?" ;;
    esac
    tree="$work/$(basename "$pkg")"
    mkdir -p "$tree"
    case "$pkg" in
        *.deb) dpkg-deb -x "$pkg" "$tree" ;;
        # Debian's rpm2cpio writes the whole archive of these packages and still exits 1; what
        # counts is what cpio unpacks (the binary is checked for below).
        *.rpm) { rpm2cpio "$pkg" || true; } > "$tree.cpio"
            (cd "$tree" && cpio -idm --quiet) < "$tree.cpio" ;;
    esac
    bin="$tree/usr/bin/secoda-agent"
    [ -f "$bin" ] || fail "$pkg: no /usr/bin/secoda-agent"
    sbom=$(ls target/packages/secoda-agent-*-"${target%%-*}".cdx.json 2>/dev/null | head -n 1)
    [ -n "$sbom" ] || fail "no ${target%%-*} SBOM in target/packages/ (run packaging/build.sh)"
    cmp -s "$sbom" "$tree/usr/share/doc/secoda-agent/secoda-agent.cdx.json" \
        || fail "$pkg: the SBOM it installs is not $sbom"
    python3 packaging/dep-list.py sbom "$sbom" > "$work/sbom"
    python3 packaging/dep-list.py binary "$bin" > "$work/embedded" \
        || fail "$pkg: its binary carries no crate list (.dep-v0)"
    # cargo metadata once per target, not per package.
    [ -f "$work/lock-$target" ] || python3 packaging/dep-list.py lock "$target" > "$work/lock-$target"
    cp "$work/lock-$target" "$work/lock"
    diff -u "$work/lock" "$work/embedded" >&2 \
        || fail "$pkg: the crates in its binary (+) differ from what Cargo.lock resolves for $target (-)"
    # No dev-dependency (the test harness, tempfile) is in it.
    if grep -E '^(secoda-agent-harness|tempfile) ' "$work/embedded" >&2; then
        fail "$pkg: its crate list names a dev-dependency (above)"
    fi
    diff -u "$work/embedded" "$work/sbom" >&2 \
        || fail "$pkg: $sbom (+) lists other crates than the binary (-)"
    "${audit[@]}" bin "$bin" || fail "$pkg: its binary has a known advisory (above)$fetch_hint"
    # The licences the package states are deny.toml's allow-list, no more and no fewer.
    case "$pkg" in
        *.deb) stated=$(sed -n 's/^License: \(.* and .*\)/\1/p' "$tree/usr/share/doc/secoda-agent/copyright" | sed 's/ and /\n/g') ;;
        *.rpm) stated=$(rpm -qp --qf '%{LICENSE}' "$pkg" | sed 's/ AND /\n/g') ;;
    esac
    [ "$(echo "$stated" | LC_ALL=C sort)" = "$allowed" ] \
        || fail "$pkg states the licences $(echo $stated); deny.toml allows $(echo $allowed)"
    # Panic messages name source files: all relative or remapped (packaging/build.sh).
    if strings "$bin" | grep -E "$PWD|${CARGO_HOME:-$HOME/.cargo}|/home/|/root/" | head -n 5 >&2; then
        fail "$pkg: its binary holds a build path (above)"
    fi
    checked=$((checked + 1))
done
[ "$checked" -eq 4 ] || fail "expected 4 packages in target/packages/, checked $checked"
echo "check-supply-chain: 4 packages: each binary lists the crates Cargo.lock resolves for its architecture (.dep-v0, $(wc -l < "$work/lock") for the last), the SBOM the same, no advisory known as of $date, no build path"
