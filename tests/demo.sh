#!/usr/bin/env bash
# The agent's whole job, end to end, with no Secoda account: start a throwaway sshd on
# loopback (playing Secoda's tunnel server), run the agent against it, and fetch a page from
# a web server on the agent's side through the tunnel with curl, as Secoda would reach a
# database. Needs root (sshd wants /run/sshd); installs openssh-server, curl, python3 if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --locked --release -q
agent=target/release/secoda-agent

work=$(mktemp -d /tmp/secoda-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

. tests/sshd-lib.sh
listen_port=$(free_port); web_port=$(free_port)

# The "Secoda" side: an sshd that accepts the agent's key and allows remote forwards.
start_test_sshd "$work"
pids+=("$SSHD_PID")

# The customer's side: a private web page only this host can reach.
mkdir "$work/www"
echo "hello from a private service, through the secoda-agent tunnel" > "$work/www/index.html"
python3 -m http.server "$web_port" --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
pids+=($!)

cat > "$work/agent.toml" <<CFG
[tunnel]
host = "127.0.0.1"
port = $SSH_PORT
user = "$(id -un)"
listen_port = $listen_port
listen_address = "127.0.0.1"
key_file = "$AGENT_KEY"
host_keys = ["$HOST_KEY_LINE"]
CFG
chmod 600 "$work/agent.toml"

"$agent" check-config --config "$work/agent.toml" --env-file /dev/null
# Its runtime directory (status socket) in the scratch directory, as systemd would set it.
RUNTIME_DIRECTORY="$work" "$agent" run --config "$work/agent.toml" --env-file /dev/null 2>"$work/agent.log" &
pids+=($!)

for _ in $(seq 1 100); do
    grep -q "tunnel up" "$work/agent.log" && curl -s -o /dev/null "http://127.0.0.1:$web_port/" && break
    sleep 0.1
done
cat "$work/agent.log"

echo "+ curl --socks5-hostname 127.0.0.1:$listen_port http://localhost:$web_port/"
page=$(curl -sS --max-time 10 --socks5-hostname "127.0.0.1:$listen_port" "http://localhost:$web_port/")
echo "$page"
if [ "$page" != "hello from a private service, through the secoda-agent tunnel" ]; then
    echo "demo: FAILED" >&2
    exit 1
fi
echo "+ secoda-agent status"
"$agent" status --socket "$work/status.sock" || { echo "demo: status FAILED" >&2; exit 1; }
echo "demo: OK (1 passed, 0 failed)"
