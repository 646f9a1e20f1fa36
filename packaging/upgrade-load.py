#!/usr/bin/env python3
"""Load for the upgrade test (packaging/test-packages.sh): through the tunnel's SOCKS5 port,
TRANSFERS byte-checked transfers of SECONDS seconds at about 1 MiB/s each to an echo service
this script runs, and a request every 100 ms for as long. Prints one JSON line: transfers that
arrived whole, requests made, and how long requests failed in all (milliseconds)."""

import json
import random
import socket
import struct
import sys
import threading
import time

listen_port, seconds, transfers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def echo_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def socks5(port):
    s = socket.create_connection(("127.0.0.1", listen_port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise OSError("SOCKS5 greeting refused")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", port))
    reply = s.recv(10)
    if len(reply) < 2 or reply[1] != 0:
        raise OSError("SOCKS5 reply %r" % reply[:2])
    return s


def transfer(port, seed, results):
    rng = random.Random(seed)
    total = seconds * 1024 * 1024
    data = bytes(rng.getrandbits(8) for _ in range(64 * 1024)) * (total // (64 * 1024))
    try:
        s = socks5(port)
        s.settimeout(30)
        back = bytearray()

        def read():
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                back.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(0, len(data), 10 * 1024):
            s.sendall(data[i:i + 10 * 1024])
            time.sleep(0.01)
        s.shutdown(socket.SHUT_WR)
        reader.join()
        results.append(bytes(back) == data)
    except OSError as e:
        print("transfer %d: %s" % (seed, e), file=sys.stderr)
        results.append(False)


def main():
    port = echo_server()
    results = []
    threads = [threading.Thread(target=transfer, args=(port, i, results)) for i in range(transfers)]
    for t in threads:
        t.start()
    requests, failed, failing_since = 0, 0.0, None
    deadline = time.monotonic() + seconds + 5
    while time.monotonic() < deadline or any(t.is_alive() for t in threads):
        ok = False
        try:
            s = socks5(port)
            s.sendall(b"ping")
            ok = s.recv(4) == b"ping"
            s.close()
        except OSError:
            pass
        requests += 1
        now = time.monotonic()
        if not ok and failing_since is None:
            failing_since = now
        elif ok and failing_since is not None:
            failed += now - failing_since
            failing_since = None
        time.sleep(0.1)
    if failing_since is not None:
        failed += time.monotonic() - failing_since
    print(json.dumps({"transfers_ok": sum(results), "transfers": transfers,
                      "requests": requests, "failed_ms": int(failed * 1000)}))


main()
