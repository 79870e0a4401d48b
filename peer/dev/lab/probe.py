"""Measurement endpoints of the network lab, run inside its hosts: round-trips and rates.

    probe.py echo  --bind IP --port P --seconds S         UDP echo; prints {"ready": true} once bound
    probe.py ping  --to IP --port P --count N             prints {"rtt_ms": [...]}
    probe.py sink  --bind IP --port P --seconds S [--tcp] prints {"bytes": .., "seconds": ..}
    probe.py send  --to IP --port P --seconds S --mbit R [--tcp]

A UDP ``send`` paces datagrams at ``--mbit`` (the lab asks for more than the link's rate, so
the link's shaper decides what arrives); a TCP ``send`` writes as fast as the socket takes.
``sink`` counts what arrives after its first ``--warmup`` seconds and reports the bytes as
they were on the wire (headers included, as ``tbf`` counts them). Only the standard library.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

UDP_PAYLOAD = 1200
UDP_OVERHEAD = 8 + 20 + 14  # UDP, IPv4 and Ethernet headers: what the shaper counts
TCP_MSS = 1448  # with timestamps, on a 1500-byte MTU
TCP_OVERHEAD = 20 + 12 + 20 + 14


def echo(args) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.bind, args.port))
    s.settimeout(0.5)
    print(json.dumps({"ready": True}), flush=True)  # the lab pings only once this line is read
    end, n = time.monotonic() + args.seconds, 0
    while time.monotonic() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            continue
        s.sendto(data, addr)
        n += 1
    return {"echoed": n}


def ping(args) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(args.timeout)
    rtts, lost = [], 0
    for i in range(args.count):
        sent = time.monotonic()
        s.sendto(i.to_bytes(4, "big") + bytes(60), (args.to, args.port))
        while True:
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                lost += 1
                break
            if int.from_bytes(data[:4], "big") == i:
                rtts.append((time.monotonic() - sent) * 1e3)
                break
        time.sleep(args.interval)
    return {"rtt_ms": rtts, "lost": lost, "median_ms": statistics.median(rtts) if rtts else None}


def sink(args) -> dict:
    kind = socket.SOCK_STREAM if args.tcp else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.bind, args.port))
    s.settimeout(args.seconds)
    if args.tcp:
        s.listen(1)
        s, _ = s.accept()
        s.settimeout(1.0)
    first = None
    counted = datagrams = 0
    started = last = None
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            if args.tcp:
                break
            continue
        if not data:
            break
        now = time.monotonic()
        if first is None:
            first = now
        if now - first < args.warmup:
            continue
        started = started or now
        last = now
        counted += len(data)
        datagrams += 1
    if started is None or last is None or last <= started:
        return {"bytes": 0, "seconds": 0.0, "mbit": 0.0}
    if args.tcp:
        wire = counted * (TCP_MSS + TCP_OVERHEAD) / TCP_MSS
    else:
        wire = counted + datagrams * UDP_OVERHEAD
    seconds = last - started
    return {"bytes": counted, "wire_bytes": wire, "seconds": seconds, "mbit": wire * 8 / seconds / 1e6}


def send(args) -> dict:
    if args.tcp:
        s = socket.create_connection((args.to, args.port), timeout=10)
        block, sent = bytes(1 << 16), 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            sent += s.send(block)
        s.close()
        return {"sent": sent}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = bytes(UDP_PAYLOAD)
    gap = (UDP_PAYLOAD + UDP_OVERHEAD) * 8 / (args.mbit * 1e6)
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) - start < args.seconds:
        due = start + n * gap
        if due > now:
            time.sleep(min(due - now, 0.002))
            continue
        try:
            s.sendto(payload, (args.to, args.port))
        except OSError:
            pass  # the local queue is full: the shaper is doing its job
        n += 1
    return {"sent": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("echo", "ping", "sink", "send"))
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--to")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--mbit", type=float, default=10.0)
    ap.add_argument("--tcp", action="store_true")
    args = ap.parse_args(argv)
    result = {"echo": echo, "ping": ping, "sink": sink, "send": send}[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
