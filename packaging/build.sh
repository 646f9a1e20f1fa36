#!/usr/bin/env bash
# Builds the packages from a clean checkout into target/packages/: a .deb and an .rpm for
# x86_64 and for aarch64, each binary linked against glibc 2.17 (so they install on RHEL 8/9
# and clones, Amazon Linux 2 and 2023, Debian 10+, Ubuntu 18.04+), plus SHA256SUMS.
#
# Why cargo-zigbuild: zig ships the headers and symbol lists of every glibc release, so one
# Debian 12 x86_64 machine links both architectures against glibc 2.17 with no cross gcc, no
# old sysroot to keep and no container. The code is compiled by the same rustc as the native
# build; zig only links.
#
# Installs its own tools when missing, pinned: cargo-deb, cargo-generate-rpm, cargo-zigbuild,
# cargo-auditable, cargo-cyclonedx (crates), zig (PyPI package ziglang, in a venv under
# ~/.cache/secoda-agent-build), the Rust targets. Needs binutils' readelf (Debian: binutils).
#
# Reproducible (packaging/check-reproducible.sh proves it): the same commit gives the same
# SHA256SUMS wherever it is checked out and whenever it is built, with the pinned toolchain
# (rust-toolchain.toml) and tools below. Every timestamp is the commit's (SOURCE_DATE_EPOCH),
# and the checkout's and cargo home's paths are remapped out of the binary.
#
# Each binary carries its crate list (cargo auditable: the .dep-v0 section, read by Trivy,
# Grype, Syft and `cargo audit bin`), and a CycloneDX SBOM of the same crates ships in both
# packages and beside them (packaging/check-supply-chain.sh --packages checks all of it).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB=3.8.0
CARGO_GENERATE_RPM=0.21.1
CARGO_ZIGBUILD=0.24.1
CARGO_AUDITABLE=0.7.7
CARGO_CYCLONEDX=0.5.9
ZIG=0.15.2
# The oldest glibc the packages run on: Rust's own minimum for *-linux-gnu.
GLIBC=2.17
# SECODA_TARGETS="x86_64-unknown-linux-gnu" builds fewer (the repository test's second release).
read -r -a TARGETS <<< "${SECODA_TARGETS:-x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu}"

# `cargo install` of the same version is a no-op; another version is replaced by the pin.
installed() { cargo install --list | grep -qx "$1 v$2:"; }
installed cargo-deb "$CARGO_DEB" || cargo install --locked "cargo-deb@$CARGO_DEB"
installed cargo-generate-rpm "$CARGO_GENERATE_RPM" || cargo install --locked "cargo-generate-rpm@$CARGO_GENERATE_RPM"
installed cargo-zigbuild "$CARGO_ZIGBUILD" || cargo install --locked "cargo-zigbuild@$CARGO_ZIGBUILD"
installed cargo-auditable "$CARGO_AUDITABLE" || cargo install --locked "cargo-auditable@$CARGO_AUDITABLE"
installed cargo-cyclonedx "$CARGO_CYCLONEDX" || cargo install --locked "cargo-cyclonedx@$CARGO_CYCLONEDX"
venv=${XDG_CACHE_HOME:-$HOME/.cache}/secoda-agent-build/zig-$ZIG
if [ ! -x "$venv/bin/python3" ] || ! "$venv/bin/python3" -m ziglang version >/dev/null 2>&1; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "ziglang==$ZIG"
fi
# cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH: the venv's python3 has it.
export PATH="$venv/bin:$PATH"
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx x86_64-unknown-linux-gnu || rustup target add x86_64-unknown-linux-gnu

# Reproducible builds: the commit's date for every timestamp (cargo-deb, cargo-generate-rpm,
# cargo-cyclonedx read it), no build path in the binary (panic messages name source files:
# the checkout and the registry's copies become fixed prefixes).
# A tree that is not a git checkout (a copy) takes its newest changelog entry's date.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null \
        || date -d "$(sed -n 's/^ -- .*>  //p' debian/changelog | head -n 1)" +%s)
fi
export SOURCE_DATE_EPOCH
cargo_home=$(cd "${CARGO_HOME:-$HOME/.cargo}" && pwd)
export RUSTFLAGS="--remap-path-prefix=$PWD=/build/secoda-agent --remap-path-prefix=$cargo_home=/cargo"

# The SBOM (CycloneDX 1.5), one per target: every crate compiled into that binary, runtime and
# build time, as cargo auditable records them in it (packaging/check-supply-chain.sh compares
# the two). The vendored russh's reference names the checkout: remapped as in the binary.
sbom() {
    cargo cyclonedx --quiet --format json --spec-version 1.5 --all --target "$1" \
        --override-filename secoda-agent.cdx
    rm -f tests/harness/secoda-agent.cdx.json
    # Cargo names the package in its id only where the folder's name is not the package's
    # ("path+file:///work/main#secoda-agent@0.1.0"): the id as if checked out at the remapped path.
    sed "s|path+file://$PWD#secoda-agent@|path+file:///build/secoda-agent#|g; s|path+file://$PWD|path+file:///build/secoda-agent|g" \
        secoda-agent.cdx.json > "target/sbom/$1.cdx.json"
    rm secoda-agent.cdx.json
}
rm -rf target/sbom
mkdir -p target/sbom

mkdir -p target/man
for page in packaging/man/*.[0-9]; do
    gzip -9n -c "$page" > "target/man/$(basename "$page").gz"
done
rm -rf target/packages
mkdir -p target/packages
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

for target in "${TARGETS[@]}"; do
    # cargo auditable runs cargo zigbuild with itself as rustc's wrapper: the crate list goes
    # into the binary's .dep-v0 section.
    cargo auditable zigbuild --locked --release --target "$target.$GLIBC"
    bin=target/$target/release/secoda-agent
    # Refuse to package a binary that a glibc-2.17 system could not load, or that links a
    # library beyond glibc's (the .deb depends on libc6 only, see Cargo.toml).
    newer=$(readelf -W --dyn-syms "$bin" | grep -oE 'GLIBC_[0-9.]+' | sort -uV \
        | awk -F'[_.]' -v max="$GLIBC" 'BEGIN { split(max, m, ".") } $2 > m[1] || ($2 == m[1] && $3 > m[2])')
    [ -z "$newer" ] || { echo "$bin needs a glibc newer than $GLIBC: $newer" >&2; exit 1; }
    needed=$(readelf -W -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' \
        | grep -vxE 'libc\.so\.6|libm\.so\.6|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-(x86-64|aarch64)\.so\.[12]' || true)
    [ -z "$needed" ] || { echo "$bin links a library the packages do not depend on: $needed" >&2; exit 1; }
    # Both packages install this target's SBOM (Cargo.toml's assets), and it goes beside them.
    sbom "$target"
    cp "target/sbom/$target.cdx.json" target/sbom/secoda-agent.cdx.json
    cp "target/sbom/$target.cdx.json" "target/packages/secoda-agent-$version-${target%%-*}.cdx.json"
    # The profile already strips; cargo-deb's own strip would need a cross binutils.
    cargo deb --no-build --no-strip --target "$target" --output target/packages/
    # cargo-generate-rpm only lowers a file's time to SOURCE_DATE_EPOCH, and keeps an older
    # one: a checkout made before the commit's date (any but a fresh clone) gave other rpms.
    # Every packaged file gets the commit's time (after the build: never a stale one).
    # (Unquoted: a source may be a glob, such as docs/*.md.)
    for asset in $(sed -n 's/.*{ source = "\([^"]*\)".*/\1/p' Cargo.toml | sed "s|^target/release/|target/$target/release/|"); do
        # shellcheck disable=SC2086
        touch -d "@$SOURCE_DATE_EPOCH" $asset
    done
    # xz, not the default zstd: rpm before 4.14 (Amazon Linux 2) cannot read a zstd payload.
    cargo generate-rpm --target "$target" --payload-compress xz --output target/packages/
done

(cd target/packages && sha256sum -- *.deb *.rpm *.cdx.json > SHA256SUMS)
# The .deb carries debian/changelog; the .rpm ships the same file (see packaging/release.sh).
ls -l target/packages/
