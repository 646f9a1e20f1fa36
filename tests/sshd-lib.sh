# Sourced by scripts that need a throwaway sshd on loopback playing Secoda's tunnel server.
# start_test_sshd DIR: generates keys in DIR, starts sshd on a free port in the background and
# sets SSHD_PID, SSH_PORT, HOST_KEY_LINE (pin), AGENT_KEY (private key path).

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_test_sshd() {
    local dir=$1
    mkdir -p /run/sshd
    [ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
    [ -f "$dir/agent_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/agent_key"
    cp "$dir/agent_key.pub" "$dir/authorized_keys"
    SSH_PORT=${SSH_PORT:-$(free_port)}
    # The same sshd_config as the Rust tests' (tests/sshd_config.in).
    sed -e "s|@PORT@|$SSH_PORT|" -e "s|@HOST_KEY@|$dir/host_key|" -e "s|@DIR@|$dir|" \
        "$(dirname "${BASH_SOURCE[0]}")/sshd_config.in" > "$dir/sshd_config"
    /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>>"$dir/sshd.log" &
    SSHD_PID=$!
    HOST_KEY_LINE=$(cut -d' ' -f1,2 "$dir/host_key.pub")
    AGENT_KEY=$dir/agent_key
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$SSH_PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "sshd did not start:" >&2
    cat "$dir/sshd.log" >&2
    return 1
}
