#!/usr/bin/env python3
"""Small network checks for testbed/measure.sh when iperf3 or ping are missing, and the
parsing measure.sh needs. Standard library only. Every loop is bounded in time.

  netcheck.py tcp-server ADDR PORT [--timeout S]      receive one connection, print JSON
  netcheck.py tcp-client ADDR PORT SECONDS            send for SECONDS, print JSON
  netcheck.py udp-echo ADDR PORT [--timeout S]        echo datagrams until idle for S
  netcheck.py udp-ping ADDR PORT COUNT [--interval S] RTTs of COUNT probes, print JSON
  netcheck.py iperf-summary FILE                      the numbers of an `iperf3 -J` run
  netcheck.py link-delta BEFORE AFTER FROM TO         ferry-linkem counters between two stats files
"""
import json
import socket
import sys
import time


def tcp_server(addr, port, timeout=60.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(1)
    s.settimeout(timeout)
    c, _ = s.accept()
    c.settimeout(timeout)
    buf = bytearray(1 << 20)
    total, first, last = 0, None, None
    while True:
        n = c.recv_into(buf)
        if n == 0:
            break
        now = time.monotonic()
        if first is None:
            first = now
        last = now
        total += n
    c.close()
    s.close()
    secs = (last - first) if first is not None and last > first else 0.0
    print(json.dumps({"bytes": total, "seconds": round(secs, 3),
                      "bits_per_second": total * 8 / secs if secs else 0.0}))


def tcp_client(addr, port, seconds):
    s = socket.create_connection((addr, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunk = b"\xa5" * (1 << 20)
    total = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        s.sendall(chunk)
        total += len(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # waits for the receiver to close: everything was delivered
    secs = time.monotonic() - start
    s.close()
    print(json.dumps({"bytes": total, "seconds": round(secs, 3), "bits_per_second": total * 8 / secs}))


def udp_echo(addr, port, timeout=10.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(timeout)
    try:
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)
    except socket.timeout:
        pass


def udp_ping(addr, port, count, interval=0.2):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    rtts = []
    for i in range(count):
        msg = i.to_bytes(4, "big") + b"x" * 52
        t0 = time.monotonic()
        s.sendto(msg, (addr, port))
        try:
            while True:
                data, _ = s.recvfrom(2048)
                if data[:4] == msg[:4]:
                    rtts.append((time.monotonic() - t0) * 1000.0)
                    break
        except socket.timeout:
            pass
        time.sleep(interval)
    out = {"sent": count, "received": len(rtts)}
    if rtts:
        out.update(min_ms=min(rtts), avg_ms=sum(rtts) / len(rtts), max_ms=max(rtts))
    print(json.dumps(out))


def iperf_summary(path):
    with open(path) as f:
        j = json.load(f)
    if "error" in j:
        print(json.dumps({"error": j["error"]}))
        return
    end = j["end"]
    sent, recv = end.get("sum_sent", {}), end.get("sum_received", {})
    print(json.dumps({
        "sender_bps": sent.get("bits_per_second", 0.0),
        "receiver_bps": recv.get("bits_per_second", 0.0),
        "retransmits": sent.get("retransmits"),
        "seconds": recv.get("seconds", 0.0),
    }))


def link_delta(before, after, src, dst):
    def load(p):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"links": []}

    def find(j):
        for link in j.get("links", []):
            if link["from"] == src and link["to"] == dst:
                return link
        return {}

    a, b = find(load(before)), find(load(after))
    keys = ["forwarded_packets", "forwarded_segments", "forwarded_bytes", "queue_dropped_segments",
            "loss_dropped_segments"]
    d = {k: b.get(k, 0) - a.get(k, 0) for k in keys}
    offered = d["forwarded_segments"] + d["queue_dropped_segments"] + d["loss_dropped_segments"]
    d["loss_percent"] = 100.0 * d["loss_dropped_segments"] / offered if offered else 0.0
    d["queue_drop_percent"] = 100.0 * d["queue_dropped_segments"] / offered if offered else 0.0
    d["segments_per_packet"] = d["forwarded_segments"] / d["forwarded_packets"] if d["forwarded_packets"] else 0.0
    print(json.dumps(d))


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, args = argv[1], argv[2:]
    opts = {}
    pos = []
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            opts[args[i][2:]] = float(args[i + 1])
            i += 2
        else:
            pos.append(args[i])
            i += 1
    if cmd == "tcp-server":
        tcp_server(pos[0], int(pos[1]), opts.get("timeout", 60.0))
    elif cmd == "tcp-client":
        tcp_client(pos[0], int(pos[1]), float(pos[2]))
    elif cmd == "udp-echo":
        udp_echo(pos[0], int(pos[1]), opts.get("timeout", 10.0))
    elif cmd == "udp-ping":
        udp_ping(pos[0], int(pos[1]), int(pos[2]), opts.get("interval", 0.2))
    elif cmd == "iperf-summary":
        iperf_summary(pos[0])
    elif cmd == "link-delta":
        link_delta(*pos[:4])
    else:
        print(f"netcheck.py: unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
