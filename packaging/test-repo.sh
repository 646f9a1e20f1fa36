#!/usr/bin/env bash
# Proves the signed package repository (packaging/repo.sh) end to end, as a host subscribes to
# it: with a throwaway signing key, publishes the packages in target/packages/ (VERSION), then
# in a booted Debian 12 (systemd-nspawn) served over HTTP from the host's loopback:
#   1. the README's keyring and deb822 .sources lines; `apt-get update` verifies the signature,
#      and fails on a tampered Packages file;
#   2. `apt-get install secoda-agent` installs VERSION; configured, enabled, the tunnel works;
#   3. an edited agent.toml; VERSION+1 is released (packaging/release.sh) and built by this
#      test, published beside VERSION, and `apt-get upgrade` (--force-confold, as
#      unattended-upgrades) with the server down returns at once, keeps the edit, replaces the
#      agent (serving nothing) with the new binary in place (`status` says VERSION+1), and the
#      tunnel comes back;
#   4. `apt-get install secoda-agent=VERSION` downgrades;
#   5. rpm: `rpm -K` passes for every signed rpm, createrepo_c's metadata lists x86_64 and
#      aarch64, and repomd.xml's signature verifies.
# Needs root. Run after packaging/build.sh (or packaging/test-packages.sh, which runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/nspawn-lib.sh

missing=()
for tool in debootstrap:debootstrap systemd-nspawn:systemd-container curl:curl python3:python3 \
    gpg:gnupg gpgv:gpgv zstd:zstd; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The cloud-init step's root filesystem, debootstrapped (on a fresh machine) meanwhile.
prefetch_rootfs "bookworm amd64 $CLOUD_INIT_PACKAGES cloud-init"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
next=$(echo "$version" | awk -F. '{ printf "%d.%d.%d", $1, $2, $3 + 1 }')
deb=target/packages/secoda-agent_${version}-1_amd64.deb
[ -f "$deb" ] || fail "$deb is missing: run packaging/build.sh first"
setup_host
repo=$work/repo
http_port=$(free_port)
base=http://127.0.0.1:$http_port

step "a throwaway signing key; publish $version"
mkdir -m 0700 "$work/gnupg"
GNUPGHOME=$work/gnupg gpg --batch --quiet --gen-key <<KEY
Key-Type: RSA
Key-Length: 3072
Key-Usage: sign
Name-Real: secoda-agent test archive key
Name-Email: test@invalid
Expire-Date: 0
%no-protection
KEY
GNUPGHOME=$work/gnupg gpg --batch --armor --export-secret-keys > "$work/signing.asc"
GNUPGHOME=$work/gnupg gpgconf --kill all 2>/dev/null || true
publish() {
    SECODA_REPO_DIR=$repo REPO_URL=$base SECODA_SIGNING_KEY_FILE=$work/signing.asc \
        SECODA_PACKAGES_DIR=$1 packaging/repo.sh > "$work/repo.log" 2>&1 \
        || fail "repo.sh: $(tail -20 "$work/repo.log")"
}
publish target/packages
for f in secoda-agent-archive-keyring.gpg secoda-agent-archive-keyring.asc apt/dists/stable/InRelease \
    apt/dists/stable/Release.gpg apt/dists/stable/main/binary-amd64/Packages.gz \
    apt/dists/stable/main/binary-arm64/Packages.gz rpm/repodata/repomd.xml rpm/repodata/repomd.xml.asc \
    rpm/secoda-agent.repo; do
    [ -s "$repo/$f" ] || fail "$f missing from the repository"
done
grep -rl "PRIVATE KEY" "$repo" >/dev/null && fail "secret key material in the repository"
gpgv --keyring "$repo/secoda-agent-archive-keyring.gpg" "$repo/apt/dists/stable/InRelease" 2>/dev/null \
    || fail "InRelease does not verify against the exported keyring"
ok "repository published: apt (amd64, arm64), rpm, keyrings; no secret key in it"

step "rpm: signatures and metadata"
rpmdb=$work/rpmdb
mkdir -p "$rpmdb"
rpm --dbpath "$rpmdb" --import "$repo/secoda-agent-archive-keyring.asc"
for r in "$repo"/rpm/packages/*.rpm; do
    out=$(rpm --dbpath "$rpmdb" -K "$r" 2>&1) || fail "rpm -K $r: $out"
    echo "$out" | grep -E "signatures OK|pgp.*OK" >/dev/null || fail "rpm -K $r is not signed: $out"
done
# An unsigned package is told apart (the check above can fail).
out=$(rpm --dbpath "$rpmdb" -K target/packages/secoda-agent-"$version"-1.x86_64.rpm 2>&1 || true)
echo "$out" | grep -E "signatures OK" >/dev/null && fail "rpm -K calls an unsigned rpm signed: $out"
primary=$(find "$repo/rpm/repodata" -name '*primary.xml*')
case "$primary" in
    *.gz) meta=$(zcat "$primary") ;;
    *.zst) meta=$(zstd -dc "$primary") ;;
    *.xz) meta=$(xz -dc "$primary") ;;
    *) meta=$(cat "$primary") ;;
esac
for arch in x86_64 aarch64; do
    echo "$meta" | grep "<arch>$arch</arch>" >/dev/null || fail "createrepo_c metadata lacks $arch"
done
gpgv --keyring "$repo/secoda-agent-archive-keyring.gpg" "$repo/rpm/repodata/repomd.xml.asc" \
    "$repo/rpm/repodata/repomd.xml" 2>/dev/null || fail "repomd.xml.asc does not verify"
grep -x "gpgcheck=1" "$repo/rpm/secoda-agent.repo" >/dev/null && grep -x "repo_gpgcheck=1" "$repo/rpm/secoda-agent.repo" >/dev/null \
    && grep -x "baseurl=$base/rpm" "$repo/rpm/secoda-agent.repo" >/dev/null || fail "secoda-agent.repo: $(cat "$repo/rpm/secoda-agent.repo")"
ok "rpm: rpm -K passes for the signed rpms (and not for an unsigned one), metadata lists x86_64 and aarch64, repomd.xml signed"

python3 -m http.server --bind 127.0.0.1 --directory "$repo" "$http_port" >/dev/null 2>&1 &
BLOB_PID=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$http_port") 2>/dev/null && break; sleep 0.1; done

step "Debian 12: subscribe (README lines)"
boot_fresh subscriber bookworm amd64 "$BOOKWORM_PACKAGES"
listen_port=$(free_port)
# Only this repository: the test does not depend on Debian's mirrors.
rm -f "$ROOT/etc/apt/sources.list"
inside install -d -m 0755 /etc/apt/keyrings
# (The README fetches it with curl; the minimal root filesystem has none.)
install -m 0644 "$repo/secoda-agent-archive-keyring.gpg" "$ROOT/etc/apt/keyrings/"
cat > "$ROOT/etc/apt/sources.list.d/secoda-agent.sources" <<SOURCES
Types: deb
URIs: $base/apt
Suites: stable
Components: main
Signed-By: /etc/apt/keyrings/secoda-agent-archive-keyring.gpg
SOURCES
# Tampered: one byte more in the amd64 index. apt must refuse it.
packages=$repo/apt/dists/stable/main/binary-amd64/Packages
cp "$packages" "$work/Packages.good"; cp "$packages.gz" "$work/Packages.gz.good"
echo >> "$packages"; gzip -9n -c "$packages" > "$packages.gz"
if inside apt-get update -q > "$work/apt-tampered.log" 2>&1 && ! grep -E "^(E|W): " "$work/apt-tampered.log" >/dev/null; then
    fail "apt-get update accepted a tampered Packages file: $(cat "$work/apt-tampered.log")"
fi
grep -iE "hash sum mismatch|unexpected size" "$work/apt-tampered.log" >/dev/null \
    || fail "apt-get update failed, but not on the tampered file: $(cat "$work/apt-tampered.log")"
cp "$work/Packages.good" "$packages"; cp "$work/Packages.gz.good" "$packages.gz"
inside rm -rf /var/lib/apt/lists/partial
inside apt-get update -q > "$work/apt-update.log" 2>&1 || fail "apt-get update: $(cat "$work/apt-update.log")"
grep -E "^(E|W): " "$work/apt-update.log" >/dev/null && fail "apt-get update: $(cat "$work/apt-update.log")"
ok "apt-get update verifies the signed repository, and refuses a tampered Packages file"

step "Debian 12: apt-get install secoda-agent ($version)"
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q secoda-agent > "$work/install.log" 2>&1 \
    || fail "apt-get install: $(tail -20 "$work/install.log")"
[ "$(inside dpkg-query -W -f='${Version}' secoda-agent)" = "$version-1" ] || fail "installed $(inside dpkg-query -W -f='${Version}' secoda-agent)"
[ "$(inside secoda-agent --version)" = "secoda-agent $version" ] || fail "--version: $(inside secoda-agent --version)"
start_web
install_key
write_config
echo "# edited by the operator" >> "$ROOT/etc/secoda-agent/agent.toml"
inside systemctl enable --now secoda-agent >/dev/null 2>&1
wait_active
check_connected
inside secoda-agent status | grep "^secoda-agent $version " >/dev/null || fail "status: $(inside secoda-agent status)"
ok "installed $version from the repository; tunnel up; status and --version say $version"

step "release $next (packaging/release.sh), build it, publish it beside $version"
mkdir -p "$work/next/target"
tar --exclude=./target --exclude=./.git -cf - . | tar -xf - -C "$work/next"
# The dependencies built for $version, so only the agent itself is compiled again.
cp -a --reflink=auto target/release target/x86_64-unknown-linux-gnu "$work/next/target/"
(cd "$work/next" && packaging/release.sh "$next" "Test release made by packaging/test-repo.sh" \
    && SECODA_TARGETS=x86_64-unknown-linux-gnu packaging/build.sh) > "$work/build-next.log" 2>&1 \
    || fail "building $next: $(tail -20 "$work/build-next.log")"
head -1 "$work/next/debian/changelog" | grep -F "secoda-agent ($next-1)" >/dev/null || fail "release.sh did not add the changelog entry"
publish "$work/next/target/packages"
ls "$repo"/apt/pool/main/s/secoda-agent/ | grep -F "_${version}-1_amd64.deb" >/dev/null || fail "$version left the pool"
ok "$next built and published; $version stays in the pool"

step "Debian 12: apt-get upgrade to $next with the server down"
old_pid=$(inside systemctl show -p MainPID --value secoda-agent)
# The server down: its listener and its sessions (as a server that stops takes them along).
pkill -P "$SSHD_PID" 2>/dev/null || true
kill "$SSHD_PID"; wait "$SSHD_PID" 2>/dev/null || true
sleep 1
inside apt-get update -q >/dev/null 2>&1 || fail "apt-get update for $next"
started=$(date +%s)
timeout 120 nsenter -t "$init_pid" -a env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold > "$work/upgrade.log" 2>&1 \
    || fail "apt-get upgrade: $(tail -20 "$work/upgrade.log")"
took=$(( $(date +%s) - started ))
[ "$took" -le 20 ] || fail "apt-get upgrade took ${took}s with the server down"
[ "$(inside dpkg-query -W -f='${Version}' secoda-agent)" = "$next-1" ] || fail "upgraded to $(inside dpkg-query -W -f='${Version}' secoda-agent)"
grep -x "# edited by the operator" "$ROOT/etc/secoda-agent/agent.toml" >/dev/null || fail "the upgrade lost the edit to agent.toml"
# The agent was down (no port, no channel): the new binary took its place, same PID.
grep "now runs the new version" "$work/upgrade.log" >/dev/null || fail "the package's output does not say the agent runs $next: $(tail -20 "$work/upgrade.log")"
[ "$(inside systemctl show -p MainPID --value secoda-agent)" = "$old_pid" ] || fail "the main process changed: an agent that served nothing is replaced in place"
[ "$(inside readlink "/proc/$old_pid/exe")" = /usr/bin/secoda-agent ] || fail "the agent runs $(inside readlink "/proc/$old_pid/exe")"
start_test_sshd "$work"
for _ in $(seq 1 150); do
    inside secoda-agent status 2>/dev/null | grep "tunnel up" >/dev/null && break
    sleep 0.2
done
inside secoda-agent status | grep "^secoda-agent $next .*tunnel up" >/dev/null || fail "after the upgrade: $(inside secoda-agent status)"
check_connected
inside zcat /usr/share/doc/secoda-agent/changelog.Debian.gz | head -1 | grep -F "($next-1)" >/dev/null \
    || fail "the installed changelog has no $next entry"
ok "apt-get upgrade returned in ${took}s with the server down, kept the edited agent.toml, the agent (serving nothing) replaced in place by $next; tunnel back"

step "Debian 12: downgrade to $version"
old_pid=$(inside systemctl show -p MainPID --value secoda-agent)
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades \
    -o Dpkg::Options::=--force-confold "secoda-agent=$version-1" > "$work/downgrade.log" 2>&1 \
    || fail "downgrade: $(tail -20 "$work/downgrade.log")"
[ "$(inside dpkg-query -W -f='${Version}' secoda-agent)" = "$version-1" ] || fail "downgraded to $(inside dpkg-query -W -f='${Version}' secoda-agent)"
wait_restarted "$old_pid"
for _ in $(seq 1 150); do
    inside secoda-agent status 2>/dev/null | grep "tunnel up" >/dev/null && break
    sleep 0.2
done
inside secoda-agent status | grep "^secoda-agent $version .*tunnel up" >/dev/null || fail "after the downgrade: $(inside secoda-agent status)"
ok "apt-get install secoda-agent=$version-1 downgrades; the agent runs $version"

stop_container

step "Debian 12: the cloud-init example (config/cloud-init.yaml) run by cloud-init from a NoCloud seed"
# The example with this test's values: the repository and its key, the test sshd, its key.
# The agent.toml lines are the example's plus what only this test needs (its sshd's port,
# user, pinned key and listen address).
python3 - "$work/user-data" "$base" "$repo/secoda-agent-archive-keyring.asc" "$AGENT_KEY" \
    "$SSH_PORT" "$HOST_KEY_LINE" <<'PY' || fail "could not fill in config/cloud-init.yaml"
import base64, sys
out, base, key_asc, agent_key, ssh_port, host_key = sys.argv[1:]
text = open("config/cloud-init.yaml").read()
armored = open(key_asc).read().strip().splitlines()
block = "\n".join("        " + line for line in armored)
placeholder = ("        -----BEGIN PGP PUBLIC KEY BLOCK-----\n"
               "        REPLACE WITH secoda-agent-archive-keyring.asc\n"
               "        -----END PGP PUBLIC KEY BLOCK-----")
assert placeholder in text
text = text.replace(placeholder, block).replace("REPO_URL", base)
text = text.replace("KEY_BASE64", base64.b64encode(open(agent_key, "rb").read()).decode())
text = text.replace('host = "HOST"', 'host = "127.0.0.1"\n      port = %s\n      user = "root"' % ssh_port)
text = text.replace("listen_port = LISTEN_PORT", "listen_port = LISTEN_PORT\n      listen_address = \"127.0.0.1\"\n"
                    "      host_keys = [\"%s\"]" % host_key)
open(out, "w").write(text)
PY
# What a cloud image has and cloud-init uses: gpg (the repository key), locales.
ROOT=$(fresh_root cloudinit bookworm amd64 "$CLOUD_INIT_PACKAGES" cloud-init)
listen_port=$(free_port)
sed -i "s/LISTEN_PORT/$listen_port/" "$work/user-data"
mkdir -p "$ROOT/var/lib/cloud/seed/nocloud"
cp "$work/user-data" "$ROOT/var/lib/cloud/seed/nocloud/user-data"
printf 'instance-id: secoda-agent-test\nlocal-hostname: cloudinit\n' > "$ROOT/var/lib/cloud/seed/nocloud/meta-data"
# The container shares the host's network: cloud-init must not configure it. And only this
# repository, as above.
# (A cloud image has its locale generated; this minimal one has C.UTF-8 only.)
printf 'network: {config: disabled}\ndatasource_list: [NoCloud, None]\nlocale: C.UTF-8\n' > "$ROOT/etc/cloud/cloud.cfg.d/99-secoda-test.cfg"
rm -f "$ROOT/etc/apt/sources.list"
boot "$ROOT"
schema=$(inside cloud-init schema --config-file /var/lib/cloud/seed/nocloud/user-data 2>&1) \
    || fail "cloud-init schema: $schema"
echo "$schema" | grep -i "valid" >/dev/null || fail "cloud-init schema: $schema"
timeout 300 nsenter -t "$init_pid" -a cloud-init status --wait >/dev/null 2>&1 || true
result=$(inside cloud-init status --long 2>&1 || true)
echo "$result" | grep -E "^status: done" >/dev/null || fail "cloud-init did not finish: $result $(inside tail -30 /var/log/cloud-init-output.log)"
wait_active
start_web
check_connected
[ "$(inside stat -c '%U:%G %a' /etc/secoda-agent/agent.toml)" = "root:secoda-agent 640" ] || fail "agent.toml: $(inside stat -c '%U:%G %a' /etc/secoda-agent/agent.toml)"
[ "$(inside stat -c '%U:%G %a' /etc/secoda-agent/id_ed25519)" = "secoda-agent:secoda-agent 600" ] || fail "the key: $(inside stat -c '%U:%G %a' /etc/secoda-agent/id_ed25519)"
[ "$(inside systemctl is-enabled secoda-agent)" = enabled ] || fail "not enabled by the user-data"
ok "cloud-init: the example passes cloud-init schema; from a NoCloud seed cloud-init added the signed repository, installed, wrote the key and agent.toml, and the tunnel serves"
stop_container

echo
echo "repository: $passed passed, 0 failed"
