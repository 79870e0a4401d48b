"""A memory cgroup for one victim process group: a hard limit (a regression fails fast instead
of swapping the machine) and the peak of the whole group (the peer, p2pd, hivemind's averager
processes), as the kernel counts it. cgroup v1 (``memory.max_usage_in_bytes``) or v2
(``memory.peak``), under this process's own cgroup; removed on close."""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path
from typing import Optional, Sequence


def _own_memory_cgroup() -> Optional[tuple[Path, str]]:
    """(directory, version) of the cgroup this process's memory is accounted in."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists():
                return base, "v1"
    for line in lines:
        if line.startswith("0::"):
            base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (base / "cgroup.controllers").exists() and "memory" in (base / "cgroup.controllers").read_text():
                return base, "v2"
    return None


def unavailable() -> Optional[str]:
    """Why a memory cgroup cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    found = _own_memory_cgroup()
    if found is None:
        return "no writable memory cgroup hierarchy"
    probe = found[0] / f"swarmtrain-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        return f"cannot create a cgroup under {found[0]}: {err}"
    return None


class MemoryCgroup:
    def __init__(self, name: str, limit_bytes: int):
        found = _own_memory_cgroup()
        if found is None:
            raise RuntimeError("no memory cgroup")
        base, self.version = found
        self.path = base / f"swarmtrain-{name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == "v1" else "memory.max"
        (self.path / limit_file).write_text(str(limit_bytes))

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command`` started inside this cgroup: the shell moves itself in, then execs it, so
        every process it starts (p2pd, averagers) is counted too."""
        procs = shlex.quote(str(self.path / "cgroup.procs"))
        return ["sh", "-c", f'echo $$ > {procs} && exec {shlex.join(command)} "$@"', "sh"]

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == "v1" else "memory.current"
        return int((self.path / name).read_text())

    def reset_peak(self) -> None:
        if self.version == "v1":
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        else:
            (self.path / "memory.peak").write_text("0")

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        return int((self.path / name).read_text())

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # processes still inside: they are being killed by pid; the kernel frees it
