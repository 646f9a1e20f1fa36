#!/usr/bin/env bash
# Proves the packages under real systemd: builds the .deb and .rpm, checks them (lintian, rpm
# queries), boots a Debian 12 minbase root filesystem with systemd-nspawn, installs the .deb,
# and drives the service against an sshd on the host's loopback (nspawn shares the host's
# network). Needs root. The pristine rootfs is cached in target/rootfs-bookworm.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/sshd-lib.sh

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
passed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }

missing=()
for tool in debootstrap:debootstrap systemd-nspawn:systemd-container lintian:lintian rpm:rpm curl:curl python3:python3; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "build"
packaging/build.sh
deb=$(ls target/packages/secoda-agent_*.deb | head -1)
rpm_file=$(ls target/packages/secoda-agent-*.rpm | head -1)

step "lintian"
lintian --fail-on error,warning "$deb" \
    || fail "lintian reports errors or warnings"
ok "lintian clean"

step "rpm metadata"
rpm_info=$(rpm -qp --scripts --configfiles "$rpm_file" 2>/dev/null)
rpm_files=$(rpm -qpl "$rpm_file" 2>/dev/null)
echo "$rpm_info" | grep -qx "/etc/secoda-agent/agent.toml" || fail "agent.toml is not %config"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm_file" | grep "^cn /etc/secoda-agent/agent.toml" >/dev/null \
    || fail "agent.toml is not %config(noreplace)"
for f in /usr/bin/secoda-agent /usr/lib/systemd/system/secoda-agent.service /usr/lib/systemd/system/secoda-agent@.service /usr/share/man/man8/secoda-agent.8.gz; do
    echo "$rpm_files" | grep -qx "$f" || fail "$f missing from the rpm"
done
echo "$rpm_info" | grep -q "useradd --system" || fail "%pre does not create the user"
echo "$rpm_info" | grep -q "try-restart secoda-agent.service" || fail "%postun does not restart on upgrade"
ok "rpm: files, %config(noreplace), scriptlets"

step "root filesystem"
cache=target/rootfs-bookworm
if [ ! -f "$cache/.complete" ]; then
    rm -rf "$cache"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,busybox,man-db,ca-certificates \
        bookworm "$cache" http://deb.debian.org/debian >/dev/null
    touch "$cache/.complete"
fi
work=$(mktemp -d /tmp/secoda-pkgtest.XXXXXX)
root=$work/root
cp -a "$cache" "$root"
nspawn_pid=""
cleanup() {
    [ -n "$nspawn_pid" ] && kill "$nspawn_pid" 2>/dev/null && wait "$nspawn_pid" 2>/dev/null
    [ -n "${SSHD_PID:-}" ] && kill "$SSHD_PID" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
cp "$deb" "$root/root/"
# debootstrap writes no /etc/hosts; every real host has one (the agent resolves "localhost").
[ -s "$root/etc/hosts" ] || printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' > "$root/etc/hosts"

start_test_sshd "$work"
listen_port=$(free_port)
web_port=$(free_port)
eu_port=$(free_port)
metrics_port=$(free_port)

step "boot"
systemd-nspawn -q -D "$root" --boot --register=no --keep-unit >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
init_pid=""
for _ in $(seq 1 100); do
    init_pid=$(pgrep -P "$nspawn_pid" | head -1 || true)
    [ -n "$init_pid" ] && nsenter -t "$init_pid" -a true 2>/dev/null && break
    sleep 0.1
done
[ -n "$init_pid" ] || fail "container did not boot: $(cat "$work/nspawn.log")"
inside() { nsenter -t "$init_pid" -a "$@"; }
# `systemctl status` exits 3 for a unit that is not active yet; only its text matters here.
unit_status() { inside systemctl status secoda-agent --no-pager -l -n 20 2>&1 || true; }
# (Pipelines below end in `grep PATTERN >/dev/null`, not `grep -q`: under pipefail an early
# exit of grep -q can fail the pipeline through SIGPIPE on its left side.)
for _ in $(seq 1 100); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.1
done
ok "booted (init pid $init_pid)"

step "install"
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/"$(basename "$deb")" >/dev/null
inside getent passwd secoda-agent >/dev/null || fail "no secoda-agent user"
[ "$(inside stat -c '%U:%G %a' /etc/secoda-agent)" = "root:secoda-agent 750" ] || fail "/etc/secoda-agent: $(inside stat -c '%U:%G %a' /etc/secoda-agent)"
[ "$(inside stat -c '%U:%G %a' /etc/secoda-agent/agent.toml)" = "root:secoda-agent 640" ] || fail "agent.toml permissions"
[ "$(inside systemctl is-enabled secoda-agent || true)" = "disabled" ] || fail "enabled on install"
[ "$(inside systemctl is-active secoda-agent || true)" = "inactive" ] || fail "started on install"
ok "installed: user, permissions, not enabled, not started"

verify=$(inside systemd-analyze verify /lib/systemd/system/secoda-agent.service /lib/systemd/system/secoda-agent@eu.service 2>&1 || true)
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
exposure=$(inside systemd-analyze security secoda-agent 2>&1 | sed -n 's/.*Overall exposure level for secoda-agent.service: \([0-9.]*\).*/\1/p')
awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 1.5) }' || fail "exposure $exposure > 1.5"
ok "systemd-analyze verify clean, security exposure $exposure"

step "configure and start (server down: must stay activating)"
inside mkdir -p /srv/www
echo "hello from inside the container" > "$root/srv/www/index.html"
inside busybox httpd -p "127.0.0.1:$web_port" -h /srv/www
install -m 0600 "$AGENT_KEY" "$root/etc/secoda-agent/id_ed25519"
inside chown secoda-agent:secoda-agent /etc/secoda-agent/id_ed25519
write_config() {
    cat > "$root/etc/secoda-agent/${1:-agent}.toml" <<CFG
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
write_config
kill "$SSHD_PID"; wait "$SSHD_PID" 2>/dev/null || true
# A short watchdog for the SIGSTOP check below.
mkdir -p "$root/etc/systemd/system/secoda-agent.service.d"
printf '[Service]\nWatchdogSec=4s\n' > "$root/etc/systemd/system/secoda-agent.service.d/test.conf"
inside systemctl daemon-reload
inside systemctl enable secoda-agent >/dev/null 2>&1
inside systemctl start --no-block secoda-agent
sleep 3
[ "$(inside systemctl is-active secoda-agent || true)" = "activating" ] || fail "not 'activating' while the server is down: $(inside systemctl is-active secoda-agent)"
unit_status | grep 'Status: "reconnecting in' >/dev/null || fail "no reconnecting STATUS: $(unit_status)"
ok "activating, STATUS says reconnecting, while the server is down"

start_test_sshd "$work"
for _ in $(seq 1 150); do
    [ "$(inside systemctl is-active secoda-agent || true)" = "active" ] && break
    sleep 0.2
done
[ "$(inside systemctl is-active secoda-agent)" = "active" ] || fail "did not become active"
(exec 3<>"/dev/tcp/127.0.0.1/$listen_port") 2>/dev/null || fail "active but the listen port is not open"
unit_status | grep "Status: \"connected to 127.0.0.1:$SSH_PORT, listening on 127.0.0.1:$listen_port" >/dev/null \
    || fail "no connected STATUS: $(unit_status)"
ok "active once the tunnel is up, STATUS connected"

page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$listen_port" "http://localhost:$web_port/")
[ "$page" = "hello from inside the container" ] || fail "curl through the tunnel: $page"
ok "curl through the tunnel reaches the service inside"

inside journalctl -u secoda-agent TUNNEL_HOST=127.0.0.1 LISTEN_PORT="$listen_port" --no-pager -q | grep "tunnel up" >/dev/null \
    || fail "no structured 'tunnel up' entry"
inside journalctl -u secoda-agent TARGET="localhost:$web_port" -o verbose --no-pager -q | grep "BYTES_FROM_TARGET=" >/dev/null \
    || fail "no structured channel entry"
ok "journal has the structured fields"

step "reload"
echo "this is not toml" > "$root/etc/secoda-agent/agent.toml"
if inside systemctl reload secoda-agent 2>/dev/null; then fail "reload with a broken config succeeded"; fi
pid=$(inside systemctl show -p MainPID --value secoda-agent)
inside /bin/sh -c "kill -HUP $pid"
sleep 1
[ "$(inside systemctl is-active secoda-agent)" = "active" ] || fail "not active after a broken reload"
unit_status | grep 'Status: "config reload failed' >/dev/null || fail "STATUS does not say the reload failed: $(unit_status)"
page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$listen_port" "http://localhost:$web_port/")
[ "$page" = "hello from inside the container" ] || fail "the old config stopped serving"
write_config
inside systemctl reload secoda-agent
ok "broken config refused by reload; the old config keeps serving"

step "status"
out=$(inside secoda-agent status) || fail "status exit $? while up: $out"
echo "$out" | grep "tunnel up" >/dev/null || fail "status: $out"
[ "$(inside stat -c '%U:%G %a' /run/secoda-agent/status.sock)" = "secoda-agent:secoda-agent 660" ] \
    || fail "status socket: $(inside stat -c '%U:%G %a' /run/secoda-agent/status.sock)"
code=0; inside setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/secoda-agent status >/dev/null 2>&1 || code=$?
[ "$code" = 77 ] || fail "a user outside group secoda-agent got exit $code from status (expected 77)"
ok "status says up (exit 0); the socket is for root and group secoda-agent only"

step "a second tunnel: secoda-agent@eu"
write_config eu "$eu_port"
printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$metrics_port" >> "$root/etc/secoda-agent/eu.toml"
inside chown root:secoda-agent /etc/secoda-agent/eu.toml
inside chmod 0640 /etc/secoda-agent/eu.toml
# Type=notify with TimeoutStartSec=infinity: bound the wait here.
timeout 60 nsenter -t "$init_pid" -a systemctl start secoda-agent@eu || fail "secoda-agent@eu did not start: $(inside systemctl status secoda-agent@eu --no-pager -l 2>&1)"
[ "$(inside systemctl is-active secoda-agent@eu)" = "active" ] || fail "secoda-agent@eu not active"
inside secoda-agent status --instance eu | grep "secoda-agent@eu .*tunnel up" >/dev/null || fail "status --instance eu: $(inside secoda-agent status --instance eu)"
page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$eu_port" "http://localhost:$web_port/")
[ "$page" = "hello from inside the container" ] || fail "curl through the eu tunnel: $page"
page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$listen_port" "http://localhost:$web_port/")
[ "$page" = "hello from inside the container" ] || fail "the first tunnel stopped serving: $page"
curl -sS --max-time 5 "http://127.0.0.1:$metrics_port/metrics" | grep "^secoda_agent_tunnel_up 1" >/dev/null \
    || fail "no metrics from secoda-agent@eu"
inside journalctl -t secoda-agent@eu --no-pager -q | grep "tunnel up" >/dev/null || fail "no journal entries as secoda-agent@eu"
inside systemctl stop secoda-agent@eu
inside test ! -e /run/secoda-agent-eu || fail "the eu runtime directory outlived its instance"
inside secoda-agent status >/dev/null || fail "stopping the eu instance touched the first tunnel"
ok "template unit: two tunnels side by side, own status socket, metrics and journal identity"

step "watchdog"
old_pid=$(inside systemctl show -p MainPID --value secoda-agent)
inside /bin/sh -c "kill -STOP $old_pid"
for _ in $(seq 1 100); do
    new_pid=$(inside systemctl show -p MainPID --value secoda-agent)
    [ "$new_pid" != "$old_pid" ] && [ "$new_pid" != 0 ] && [ "$(inside systemctl is-active secoda-agent || true)" = active ] && break
    sleep 0.2
done
[ "$new_pid" != "$old_pid" ] || fail "the watchdog did not restart a stopped agent"
for _ in $(seq 1 50); do
    inside journalctl -u secoda-agent --no-pager -q | grep -i "watchdog timeout" >/dev/null && break
    sleep 0.2
done
inside journalctl -u secoda-agent --no-pager -q | grep -i "watchdog timeout" >/dev/null \
    || fail "no watchdog timeout in the journal: $(inside journalctl -u secoda-agent --no-pager -q -n 30)"
ok "SIGSTOP: the watchdog restarted the agent (pid $old_pid -> $new_pid)"

step "upgrade restarts a running agent"
before=$(inside systemctl show -p MainPID --value secoda-agent)
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall /root/"$(basename "$deb")" >/dev/null
after=$(inside systemctl show -p MainPID --value secoda-agent)
[ "$before" != "$after" ] || fail "not restarted on upgrade"
grep -q "listen_port = $listen_port" "$root/etc/secoda-agent/agent.toml" || fail "the upgrade replaced the operator's config"
ok "upgrade restarted the agent and kept the config"

step "purge"
inside env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q secoda-agent >/dev/null
for p in /etc/secoda-agent /usr/bin/secoda-agent /lib/systemd/system/secoda-agent.service /lib/systemd/system/secoda-agent@.service /usr/share/doc/secoda-agent; do
    [ ! -e "$root$p" ] || fail "$p left behind after purge"
done
[ "$(inside systemctl is-active secoda-agent || true)" != active ] || fail "agent still running after purge"
ok "purge leaves nothing behind"

echo
echo "packages: $passed passed, 0 failed"
