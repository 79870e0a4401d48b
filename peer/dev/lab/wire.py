"""One shaped link of the network lab: delay, jitter and loss between two TAP devices.

This kernel has no ``netem``, so the lab's links add delay, jitter and loss here, in user
space; ``tbf`` on each TAP device's egress (set by ``netns.py``) shapes the rate in the kernel,
before a frame reaches this process, as a link serialises frames at its rate before they
propagate. Each direction is a FIFO: a frame leaves ``delay`` +- ``jitter`` (uniform) after it
arrived, but never before the frame ahead of it (a real link does not reorder), and is dropped
with probability ``loss``.

    ip netns exec HOST_NS python wire.py --a eth0 --b-ns /run/netns/SW --b p-h1 \\
        --a-to-b 20,0,0.001 --b-to-a 20,0,0.001 --seed 1

``--a`` is a persistent TAP device in the namespace the process starts in, ``--b`` one in the
namespace ``--b-ns`` names. Prints ``ready`` once both are open; stops on SIGTERM or SIGINT.
Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_FRAME = 65536
BATCH = 256  # frames read from one device before the other gets its turn


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def enter_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path) as ns:
        if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")


def parse_direction(text: str) -> tuple[float, float, float]:
    """'delay_ms,jitter_ms,loss' -> (delay s, jitter s, loss probability)."""
    delay, jitter, loss = (float(x) for x in text.split(","))
    if delay < 0 or jitter < 0 or jitter > delay or not 0 <= loss < 1:
        raise ValueError(f"bad direction {text!r}: need 0 <= jitter <= delay, 0 <= loss < 1")
    return delay / 1e3, jitter / 1e3, loss


class Direction:
    """Frames read from one device, waiting to be written to the other."""

    def __init__(self, src: int, dst: int, delay: float, jitter: float, loss: float, rng: random.Random):
        self.src, self.dst = src, dst
        self.delay, self.jitter, self.loss, self.rng = delay, jitter, loss, rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last = 0.0
        self.dropped = self.passed = 0

    def take(self, now: float) -> None:
        for _ in range(BATCH):
            try:
                frame = os.read(self.src, MAX_FRAME)
            except BlockingIOError:
                return
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            wobble = self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
            self.last = max(self.last, now + self.delay + wobble)
            self.queue.append((self.last, frame))

    def release(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, frame = self.queue.popleft()
            try:
                os.write(self.dst, frame)
                self.passed += 1
            except (BlockingIOError, OSError):
                self.dropped += 1  # the other side's queue is full: the frame is lost, as on a wire

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="TAP device in this namespace")
    ap.add_argument("--b", required=True, help="TAP device in --b-ns")
    ap.add_argument("--b-ns", required=True, help="path of the other namespace (/run/netns/NAME)")
    ap.add_argument("--a-to-b", required=True, help="delay_ms,jitter_ms,loss")
    ap.add_argument("--b-to-a", required=True, help="delay_ms,jitter_ms,loss")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    a_to_b, b_to_a = parse_direction(args.a_to_b), parse_direction(args.b_to_a)
    fa = open_tap(args.a)
    enter_netns(args.b_ns)
    fb = open_tap(args.b)
    rng = random.Random(args.seed)
    directions = (Direction(fa, fb, *a_to_b, rng), Direction(fb, fa, *b_to_a, rng))
    by_src = {d.src: d for d in directions}
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        dues = [t for t in (d.next_due() for d in directions) if t is not None]
        timeout = max(0.0, min(dues) - now) if dues else 0.5
        try:
            readable, _, _ = select.select([fa, fb], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in readable:
            by_src[fd].take(now)
        for d in directions:
            d.release(time.monotonic())
    print(
        f"stopped: a->b {directions[0].passed} passed {directions[0].dropped} dropped, "
        f"b->a {directions[1].passed} passed {directions[1].dropped} dropped",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
