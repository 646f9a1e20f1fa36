#!/usr/bin/env bash
# Prints the path of a Debian 13 ("trixie") root filesystem whose /usr/sbin/sshd is OpenSSH 10:
# the tests run it in a chroot on a loopback port as a second server (SECODA_TEST_OPENSSH10,
# tests/harness/src/sshd.rs). Made once per machine: a copy of the packaging tests' cached
# Debian 13 root filesystem (packaging/nspawn-lib.sh), kept apart so that the tests' files in
# it never reach a booted system.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/nspawn-lib.sh
command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
pristine=$(rootfs trixie amd64 "$TRIXIE_PACKAGES")
root=$ROOTFS_CACHE/openssh10
if [ "$(cat "$root/.from" 2>/dev/null)" != "$(cat "$pristine/.complete")" ]; then
    rm -rf "$root"
    cp -a "$pristine" "$root.tmp"
    mkdir -p "$root.tmp/run/sshd"
    cat "$pristine/.complete" > "$root.tmp/.from"
    mv "$root.tmp" "$root"
fi
version=$(chroot "$root" /usr/sbin/sshd -V 2>&1 || true)
case "$version" in
    OpenSSH_10*) ;;
    *) fail "$root/usr/sbin/sshd is not OpenSSH 10: $version" ;;
esac
echo "$root"
