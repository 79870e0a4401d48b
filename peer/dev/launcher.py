"""Starting and stopping local peer processes: used by the demo, the tests and the benchmarks.

Every process starts in its own session (its own process group), is waited on through the
JSON events it prints (never sleeps), and is stopped by its process id and group id, never by
name: SIGINT first, then SIGKILL for whatever is left, p2pd included.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from peer.base.procs import descendants, kill_process_tree

SWARMTRAIN = [sys.executable, "-m", "peer.cli"]


@dataclass
class Proc:
    """One child process whose JSON-lines output is collected in a background thread."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    events: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    _q: "queue.Queue" = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_event(self, name: str, timeout: float, predicate: Callable[[dict], bool] = lambda e: True) -> dict:
        """Block until the process prints an event called name that satisfies predicate."""
        deadline = time.monotonic() + timeout
        for e in list(self.events):
            if e.get("event") == name and predicate(e):
                return e
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.name}: no {name!r} event within {timeout:.0f}s; last output:\n" + "".join(self.lines[-30:])
                )
            try:
                e = self._q.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.alive() and self._q.empty():
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode} before {name!r}; output:\n"
                        + "".join(self.lines[-40:])
                    ) from None
                continue
            if e.get("event") == name and predicate(e):
                return e

    def last_event(self, name: str) -> Optional[dict]:
        for e in reversed(self.events):
            if e.get("event") == name:
                return e
        return None


def _pump(proc: Proc) -> None:
    with open(proc.log_path, "a") as log:
        for line in proc.popen.stdout:
            log.write(line)
            log.flush()
            proc.lines.append(line)
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                proc.events.append(event)
                proc._q.put(event)


class Cluster:
    """A set of local processes that are all stopped on exit, even on failure."""

    def __init__(self, workdir: Path, *, env: Optional[dict] = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}

    def start(self, name: str, args: Sequence[str], *, command: Optional[Sequence[str]] = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            [*(command or SWARMTRAIN), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.workdir,
            env=self.env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        proc = Proc(name, popen, log_path)
        threading.Thread(target=_pump, args=(proc,), daemon=True).start()
        self.procs.append(proc)
        return proc

    def bootstrap(
        self,
        name: str = "bootstrap",
        *,
        spec_path: Optional[Path] = None,
        timeout: float = 60.0,
        extra: Sequence[str] = (),
    ) -> tuple[Proc, str]:
        args = [
            "bootstrap",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--identity",
            str(self.workdir / f"{name}.id"),
            "--log-json",
            *extra,
        ]
        if spec_path is not None:
            args += ["--spec", str(spec_path)]
        proc = self.start(name, args)
        ready = proc.wait_event("ready", timeout)
        return proc, ready["maddrs"][0]

    def stock_dht(self, name: str = "hivemind-dht", *, timeout: float = 60.0) -> tuple[Proc, str]:
        """hivemind's own ``hivemind-dht`` as the bootstrap (it publishes no spec: peers need
        ``--spec``); returns it and the first multiaddr it prints."""
        exe = Path(sys.executable).parent / "hivemind-dht"
        if not exe.exists():
            raise FileNotFoundError(f"{exe}: hivemind's CLI is not installed beside this Python")
        proc = self.start(
            name,
            ["--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--identity_path", str(self.workdir / f"{name}.id")],
            command=[str(exe)],
        )
        deadline = time.monotonic() + timeout
        while (maddr := find_maddr("".join(proc.lines))) is None:
            if not proc.alive():
                raise RuntimeError(f"{name} exited before printing its address:\n{''.join(proc.lines)[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} printed no address within {timeout:.0f}s")
            time.sleep(0.2)
        return proc, maddr

    def peer(
        self,
        name: str,
        initial_peers: Sequence[str],
        *,
        spec_path: Optional[Path] = None,
        run_id: Optional[str] = None,
        stage: Optional[int] = None,
        data: Optional[str] = None,
        extra: Sequence[str] = (),
        command: Optional[Sequence[str]] = None,
    ) -> Proc:
        """``command``: what runs ``swarmtrain`` (default: this Python), e.g. a wrapper that puts
        the peer into a memory cgroup."""
        args = [
            "run",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--log-json",
            "--threads",
            "1",
            "--announce-period",
            "2",
            "--status-every",
            "2",
        ]
        for m in initial_peers:
            args += ["--initial-peers", m]
        args += ["--spec", str(spec_path)] if spec_path is not None else ["--run", run_id]
        if stage is not None:
            args += ["--stage", str(stage)]
        if data is not None:
            args += ["--data", data]
        return self.start(name, [*args, *extra], command=command)

    def all_pids(self) -> set[int]:
        pids = set()
        for p in self.procs:
            pids.add(p.pid)
            pids.update(descendants(p.pid))
        return pids

    def stop(self, proc: Proc, timeout: float = 30.0) -> None:
        kill_process_tree(proc.popen, timeout=timeout)

    def kill(self, proc: Proc) -> None:
        """SIGKILL the peer itself only, as a crash would: its reaper must clean up the rest."""
        try:
            os.kill(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.popen.wait(timeout=10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            kill_process_tree(proc.popen, timeout=20.0)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MADDR = re.compile(r"/ip4/[0-9.]+/tcp/[0-9]+/p2p/[A-Za-z0-9]+")


def find_maddr(text: str) -> Optional[str]:
    match = _MADDR.search(text)
    return match.group(0) if match else None
