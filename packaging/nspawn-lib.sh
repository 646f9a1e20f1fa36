# Shared by packaging/test-packages.sh and packaging/test-repo.sh (sourced, from the
# repository root): cached Debian root filesystems, booting them with systemd-nspawn,
# commands inside, a test sshd on the host's loopback (nspawn shares the host's network),
# and the checks both scripts make on an installed agent. Sourcing it defines; setup_host
# starts.
. tests/sshd-lib.sh

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
passed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }

# rootfs RELEASE ARCH INCLUDE [TAG]: the path of a cached pristine minbase root filesystem
# (TAG tells apart two package lists of one release): Debian's
# from deb.debian.org, Ubuntu's (focal, jammy, noble) from debootstrap's default Ubuntu mirror,
# checked against Ubuntu's archive key (ubuntu_keyring).
ROOTFS_CACHE=${SECODA_ROOTFS_CACHE:-/var/cache/secoda-agent-test}
UBUNTU_SUITES="focal jammy noble"
rootfs() {
    mkdir -p "$ROOTFS_CACHE"
    # One debootstrap per root filesystem at a time (prefetch_rootfs runs some in the
    # background while the caller may ask for the same one).
    (
        flock 9
        make_rootfs "$@"
    ) 9>"$ROOTFS_CACHE/.lock-$1-$2${4:+-$4}"
}
make_rootfs() {
    local dir=$ROOTFS_CACHE/$1-$2${4:+-$4} stamp="$1 $2 $3"
    local source=(http://deb.debian.org/debian) options=()
    if [ "$(cat "$dir/.complete" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$dir" "$dir.tmp"
        mkdir -p "$ROOTFS_CACHE"
        case " $UBUNTU_SUITES " in
            *" $1 "*)
                source=()
                options=(--keyring="$(ubuntu_keyring)" --components=main,universe)
                # bookworm's debootstrap has no script for noble; Ubuntu's own scripts link it.
                [ -e "/usr/share/debootstrap/scripts/$1" ] || ln -s gutsy "/usr/share/debootstrap/scripts/$1"
                ;;
        esac
        debootstrap --arch="$2" --variant=minbase ${3:+--include="$3"} "${options[@]}" "$1" "$dir.tmp" \
            "${source[@]}" >"$dir.log" 2>&1 \
            || fail "debootstrap $1 $2: $(tail -5 "$dir.log")"
        echo "$stamp" > "$dir.tmp/.complete"
        mv "$dir.tmp" "$dir"
    fi
    echo "$dir"
}
# prefetch_rootfs "RELEASE ARCH INCLUDE [TAG]"...: make those root filesystems in the
# background (a fresh machine debootstraps each once; the packages build meanwhile).
prefetch_rootfs() {
    local spec
    for spec in "$@"; do
        # shellcheck disable=SC2086
        (set -f; rootfs $spec >/dev/null 2>&1 || true) &
    done
}
# ubuntu_keyring: the path of Ubuntu's archive keyring, from Debian 13's ubuntu-keyring package
# (bookworm has none). The package is found in Debian 13's Packages list, which debootstrap
# verified, and checked against the checksum there.
ubuntu_keyring() {
    (
        flock 8
        make_ubuntu_keyring
    ) 8>"$ROOTFS_CACHE/.lock-ubuntu-keyring"
}
make_ubuntu_keyring() {
    local keyring=$ROOTFS_CACHE/ubuntu-archive-keyring.gpg trixie list entry sum
    if [ ! -s "$keyring" ]; then
        trixie=$(rootfs trixie amd64 "$TRIXIE_PACKAGES")
        list=$(ls "$trixie"/var/lib/apt/lists/*_dists_trixie_main_binary-amd64_Packages)
        entry=$(awk '/^Package: ubuntu-keyring$/ { on = 1 } on && /^$/ { exit } on' "$list")
        sum=$(echo "$entry" | sed -n 's/^SHA256: //p')
        curl -fsS -o "$ROOTFS_CACHE/ubuntu-keyring.deb" \
            "http://deb.debian.org/debian/$(echo "$entry" | sed -n 's/^Filename: //p')" \
            || fail "could not download ubuntu-keyring"
        echo "$sum  $ROOTFS_CACHE/ubuntu-keyring.deb" | sha256sum -c --quiet >&2 || fail "ubuntu-keyring: checksum"
        rm -rf "$ROOTFS_CACHE/ubuntu-keyring"
        dpkg-deb -x "$ROOTFS_CACHE/ubuntu-keyring.deb" "$ROOTFS_CACHE/ubuntu-keyring"
        cp "$ROOTFS_CACHE/ubuntu-keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" "$keyring"
    fi
    echo "$keyring"
}
# fresh_root NAME RELEASE ARCH INCLUDE [TAG]: a fresh copy of a cached root filesystem, with
# the /etc/hosts every real host has (debootstrap writes none; the agent resolves "localhost").
fresh_root() {
    local root=$work/$1
    cp -a "$(rootfs "$2" "$3" "$4" "${5:-}")" "$root"
    [ -s "$root/etc/hosts" ] || printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' > "$root/etc/hosts"
    echo "$root"
}

# What the booted Debian 12 needs: systemd, busybox (httpd, kill), man-db, rpm (scriptlet
# test), ansible-core and sudo (the Ansible role's test; python3-cffi-backend by name, since
# debootstrap does not resolve the virtual package python3-cryptography needs).
BOOKWORM_PACKAGES=systemd,systemd-sysv,dbus,busybox,man-db,ca-certificates,rpm,ansible-core,python3-cffi-backend,sudo
# The newer systems booted for the core checks. Debian 13's also carries openssh-server: the
# tests run its sshd (OpenSSH 10) as a second server (tests/openssh10-root.sh).
CORE_PACKAGES=systemd,systemd-sysv,dbus,busybox,man-db,ca-certificates
TRIXIE_PACKAGES=$CORE_PACKAGES,openssh-server
# A cloud VM's image for the cloud-init example (test-repo.sh): cloud-init, and what it uses.
CLOUD_INIT_PACKAGES=$BOOKWORM_PACKAGES,cloud-init,gnupg,locales

nspawn_pid=""
agent_pid=""
mounted=""
stop_container() {
    if [ -n "$nspawn_pid" ]; then
        kill "$nspawn_pid" 2>/dev/null || true
        wait "$nspawn_pid" 2>/dev/null || true
        nspawn_pid=""
    fi
}
cleanup() {
    stop_container
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null
    [ -n "${SSHD_PID:-}" ] && kill "$SSHD_PID" 2>/dev/null
    [ -n "${BLOB_PID:-}" ] && kill "$BLOB_PID" 2>/dev/null
    [ -n "$mounted" ] && umount "$mounted" 2>/dev/null
    rm -rf --one-file-system "$work"
}
# setup_host: a work directory ($work) and the test sshd, both gone on exit.
setup_host() {
    work=$(mktemp -d /tmp/secoda-pkgtest.XXXXXX)
    trap cleanup EXIT
    start_test_sshd "$work"
}

# boot ROOT: boots it with systemd-nspawn; sets init_pid for `inside`.
boot() {
    local root=$1
    systemd-nspawn -q -D "$root" --boot --register=no --keep-unit >"$work/nspawn-$(basename "$root").log" 2>&1 &
    nspawn_pid=$!
    init_pid=""
    for _ in $(seq 1 100); do
        init_pid=$(pgrep -P "$nspawn_pid" | head -1 || true)
        [ -n "$init_pid" ] && nsenter -t "$init_pid" -a true 2>/dev/null && break
        sleep 0.1
    done
    [ -n "$init_pid" ] || fail "container did not boot: $(cat "$work/nspawn-$(basename "$root").log")"
    for _ in $(seq 1 100); do
        state=$(inside systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.1
    done
    ROOT=$root
    ok "booted $(grep PRETTY_NAME "$root/etc/os-release" | cut -d'"' -f2), systemd $(inside systemctl --version | head -1 | cut -d' ' -f2) (init pid $init_pid)"
}
inside() { nsenter -t "$init_pid" -a "$@"; }
# boot_fresh NAME RELEASE ARCH PACKAGES: boot a fresh copy of a cached root filesystem.
boot_fresh() {
    local root
    root=$(fresh_root "$@") || exit 1
    boot "$root"
}
# `systemctl status` exits 3 for a unit that is not active yet; only its text matters here.
unit_status() { inside systemctl status "${1:-secoda-agent}" --no-pager -l -n 20 2>&1 || true; }
# (Pipelines below end in `grep PATTERN >/dev/null`, not `grep -q`: under pipefail an early
# exit of grep -q can fail the pipeline through SIGPIPE on its left side.)

# write_config [NAME [LISTEN_PORT [ROOT]]]: a config for the host's sshd with the test key.
write_config() {
    cat > "${3:-$ROOT}/etc/secoda-agent/${1:-agent}.toml" <<CFG
[tunnel]
host = "127.0.0.1"
port = $SSH_PORT
user = "root"
listen_port = ${2:-$listen_port}
listen_address = "127.0.0.1"
key_file = "/etc/secoda-agent/id_ed25519"
host_keys = ["$HOST_KEY_LINE"]
keepalive_interval = "5s"
keepalive_max = 2
CFG
}
install_key() {
    install -m 0600 "$AGENT_KEY" "$ROOT/etc/secoda-agent/id_ed25519"
    inside chown secoda-agent:secoda-agent /etc/secoda-agent/id_ed25519
}
# After a first install: the system user, root:secoda-agent 0750 / 0640, unit neither enabled
# nor started (an unconfigured agent must not crash-loop).
check_fresh_install() {
    inside getent passwd secoda-agent >/dev/null || fail "no secoda-agent user"
    [ "$(inside stat -c '%U:%G %a' /etc/secoda-agent)" = "root:secoda-agent 750" ] || fail "/etc/secoda-agent: $(inside stat -c '%U:%G %a' /etc/secoda-agent)"
    [ "$(inside stat -c '%U:%G %a' /etc/secoda-agent/agent.toml)" = "root:secoda-agent 640" ] || fail "agent.toml: $(inside stat -c '%U:%G %a' /etc/secoda-agent/agent.toml)"
    [ "$(inside systemctl is-enabled secoda-agent || true)" = "disabled" ] || fail "enabled on install: $(inside systemctl is-enabled secoda-agent)"
    [ "$(inside systemctl is-active secoda-agent || true)" = "inactive" ] || fail "started on install"
}
# A web server inside the container, reached through the tunnel by name ("localhost").
start_web() {
    web_port=$(free_port)
    inside mkdir -p /srv/www
    echo "hello from inside the container" > "$ROOT/srv/www/index.html"
    inside busybox httpd -p "127.0.0.1:$web_port" -h /srv/www
}
fetch_through() {
    local page
    page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$1" "http://localhost:$web_port/") || true
    [ "$page" = "hello from inside the container" ] || fail "${2:-curl through the tunnel}: $page"
}
wait_active() {
    for _ in $(seq 1 150); do
        [ "$(inside systemctl is-active "${1:-secoda-agent}" || true)" = "active" ] && return 0
        sleep 0.2
    done
    fail "${1:-secoda-agent} did not become active: $(unit_status "${1:-secoda-agent}")"
}
# wait_restarted OLD_PID: the unit runs a new main process (restarts are queued with
# --no-block by the package scripts, so they happen after the package tool returns).
wait_restarted() {
    local pid=""
    for _ in $(seq 1 150); do
        pid=$(inside systemctl show -p MainPID --value secoda-agent)
        [ "$pid" != "$1" ] && [ "$pid" != 0 ] && [ "$(inside systemctl is-active secoda-agent || true)" = active ] && return 0
        sleep 0.2
    done
    fail "not restarted (main pid still $pid): $(unit_status)"
}
check_connected() {
    unit_status | grep "Status: \"connected to 127.0.0.1:$SSH_PORT, listening on 127.0.0.1:$listen_port" >/dev/null \
        || fail "no connected STATUS: $(unit_status)"
    fetch_through "$listen_port"
}
check_status_command() {
    local out
    out=$(inside secoda-agent status) || fail "status exit $? while up: $out"
    echo "$out" | grep "tunnel up" >/dev/null || fail "status: $out"
}
# A broken config is refused by reload (even by a bare SIGHUP); the old one keeps serving.
check_reload() {
    echo "this is not toml" > "$ROOT/etc/secoda-agent/agent.toml"
    if inside systemctl reload secoda-agent 2>/dev/null; then fail "reload with a broken config succeeded"; fi
    local pid
    pid=$(inside systemctl show -p MainPID --value secoda-agent)
    inside /bin/sh -c "kill -HUP $pid"
    sleep 1
    [ "$(inside systemctl is-active secoda-agent)" = "active" ] || fail "not active after a broken reload"
    unit_status | grep 'Status: "config reload failed' >/dev/null || fail "STATUS does not say the reload failed: $(unit_status)"
    fetch_through "$listen_port" "the old config stopped serving"
    write_config
    inside systemctl reload secoda-agent
}
check_purge() {
    inside env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q secoda-agent >/dev/null
    for p in /etc/secoda-agent /usr/bin/secoda-agent /lib/systemd/system/secoda-agent.service /lib/systemd/system/secoda-agent@.service /usr/share/doc/secoda-agent; do
        [ ! -e "$ROOT$p" ] || fail "$p left behind after purge"
    done
    [ "$(inside systemctl is-active secoda-agent || true)" != active ] || fail "agent still running after purge"
}
