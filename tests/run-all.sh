#!/usr/bin/env bash
# Runs every test. Installs what the tests need when it is missing (Debian; needs root, as the
# tests do: they start their own sshd, which needs /run/sshd).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
# Fault tests black-hole the server with nft inside a network namespace (ip netns).
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
# Proxy tests run real proxies on loopback: squid (HTTP CONNECT) and Dante (SOCKS5); openssl
# hashes their test passwords.
command -v squid >/dev/null || missing+=(squid)
command -v danted >/dev/null || missing+=(dante-server)
command -v openssl >/dev/null || missing+=(openssl)
# The monitoring rules and dashboard are checked with promtool and a real Prometheus.
command -v promtool >/dev/null || missing+=(prometheus)
# packaging/check-vendor.sh applies vendor/russh.patch to the released crate.
command -v patch >/dev/null || missing+=(patch)
# tests/openssh10-root.sh makes a Debian 13 root filesystem for OpenSSH 10's sshd.
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The pinned compiler (rust-toolchain.toml).
packaging/toolchain.sh

# The fault-injection feature compiles in the faults tests inject (src/fault.rs), inert unless
# a test asks for one; packages are built without it.
cargo test --locked --features fault-injection
# The tests of the session, the tunnel, a standby pair and the negotiated algorithms once
# more against OpenSSH 10 (Debian 13's sshd, in a chroot): the server a customer's agent
# meets from 2026 on, with a post-quantum key exchange by default.
openssh10=$(tests/openssh10-root.sh)
SECODA_TEST_OPENSSH10=$openssh10 \
    cargo test --locked --features fault-injection --test session --test tunnel --test standby --test algorithms
bash tests/demo.sh
