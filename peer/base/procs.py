"""Process hygiene: a peer and everything it starts (hivemind's DHT and averager processes,
p2pd daemons) live and die together, even when the peer is killed with SIGKILL.

hivemind starts p2pd and helper processes that outlive a killed parent. A peer therefore
makes itself the leader of its own process group and forks a tiny reaper first; when the
peer dies for any reason, the reaper kills the group by its id and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterable, Optional


def become_group_leader() -> int:
    """Make this process the leader of its own process group (a shell job already is)."""
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
    return os.getpgrp()


def start_reaper(poll_interval: float = 0.2) -> Optional[int]:
    """Fork a watcher that kills this process group once this process is gone.

    Call it before any thread or child exists (fork after threads is unsafe).
    Returns the reaper's pid, or None where fork is unavailable.
    """
    if not hasattr(os, "fork"):
        return None
    pgid = become_group_leader()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # In the reaper: ignore terminal signals meant for the peer, then wait for its death.
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the reaper exits with os._exit
        # Leave the group so that killing it does not kill us before we finish the sweep.
        os.setpgid(0, 0)
        while _alive(parent) and os.getppid() == parent:
            time.sleep(poll_interval)
        _kill_group(pgid)
    finally:
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_group(pgid: int, grace: float = 3.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is pgid, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry))
    return members


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_process_tree(proc: subprocess.Popen | int, timeout: float = 10.0) -> None:
    """Stop a child started with start_new_session=True and everything in its group, by id.

    SIGINT first (a peer's clean shutdown), then SIGKILL to the group after ``timeout``.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    pgids = {pid}
    stray = set(descendants(pid))
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in stray:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if isinstance(proc, subprocess.Popen):
                proc.poll()
            if not group_members(pid) and not [p for p in stray if _alive(p)]:
                break
            time.sleep(0.1)
        else:
            continue
        break
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def alive(pids: Iterable[int]) -> list[int]:
    return [p for p in pids if _alive(p)]
