#!/usr/bin/env bash
# Makes the toolchain rust-toolchain.toml pins available before anything runs cargo. With
# access to the toolchain server, rustup installs it. Without (a build machine that reaches
# only package registries), a stable toolchain that is that very release is linked under its
# number, which is what rustup would have installed.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
host=$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p')
if rustup toolchain list | grep -q "^$want-$host"; then
    exit 0
fi
if RUSTUP_TOOLCHAIN=stable rustc --version | grep -q "^rustc $want "; then
    home=${RUSTUP_HOME:-$HOME/.rustup}
    ln -s "stable-$host" "$home/toolchains/$want-$host"
    echo "toolchain: stable is $want; linked as $want-$host"
else
    rustup toolchain install "$want" --profile minimal --component rustfmt,clippy \
        --target x86_64-unknown-linux-gnu,aarch64-unknown-linux-gnu
fi
