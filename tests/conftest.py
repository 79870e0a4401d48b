"""Shared fixtures for tests that start real peers on 127.0.0.1.

- ``tiny_spec`` / ``spec_path``: the tiny preset (2 stages) with test-speed averaging, saved as
  TOML for ``--spec``;
- ``text_data``: a directory of generated, learnable text (a loss curve shows within seconds);
- ``cluster``: a ``peer.dev.launcher.Cluster`` in ``tmp_path`` that is always closed, and that
  checks afterwards that none of its processes (peers, bootstrap, p2pd, hivemind's helpers)
  is left alive;
- ``assert_all_gone``: the same check for any set of pids.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"  # modules the tests import (checkpoint_helpers, outer_helpers, ...)
for _path in (HELPERS, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("OMP_NUM_THREADS", "1")

from peer.base.procs import alive  # noqa: E402
from peer.dev.launcher import Cluster  # noqa: E402
from protocol.spec import RunSpec, preset_spec  # noqa: E402

# Averaging timings short enough for tests; the tiny preset's own values are already small.
TEST_TRAINING = dict(target_batch_size=32, matchmaking_time=2.0, averaging_timeout=15.0)


def make_tiny_spec(*, run_id: str = "swarmtest", stages: int = 2, **training) -> RunSpec:
    return preset_spec("tiny", stages=stages, run_id=run_id, training={**TEST_TRAINING, **training})


@pytest.fixture
def tiny_spec() -> RunSpec:
    return make_tiny_spec()


@pytest.fixture
def spec_path(tmp_path, tiny_spec) -> Path:
    path = tmp_path / "spec.toml"
    tiny_spec.save(path)
    return path


_WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "tau upsilon phi chi psi omega the swarm trains one model together peer to peer"
).split()


def write_text_data(directory: Path, files: int = 8, lines: int = 400, seed: int = 0) -> Path:
    """Text with a lot of structure (a small vocabulary of words in counting patterns), so that
    a byte-level model's loss falls well below its starting ~5.5 within a few hundred steps."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        out = []
        for i in range(lines):
            a, b = rng.sample(_WORDS, 2)
            n = rng.randrange(100)
            out.append(f"{a} {b} {n} {n + 1} {n + 2}; {b} {a} {a} {b}.")
        (directory / f"part{f:02d}.txt").write_text("\n".join(out) + "\n")
    return directory


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    return write_text_data(tmp_path_factory.mktemp("text-data"))


def command_line(pid: int) -> str:
    """The command line of a live process, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def assert_all_gone(pids: Iterable[int], timeout: float = 20.0) -> None:
    """Every pid has exited (zombies count as gone), waiting up to ``timeout`` for the
    reapers, which poll their peer every 0.2 s and give the group 3 s before SIGKILL."""
    pids = set(pids)
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(left)
    if left:
        described = [f"{pid}: {(command_line(pid) or '?')[:160]}" for pid in left]
        raise AssertionError("processes still alive:\n" + "\n".join(described))


class TrackedCluster(Cluster):
    """A Cluster that remembers every pid it has seen (``track``), so that a check after
    ``close`` also covers children that existed only while it ran (p2pd, averagers)."""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.seen: set[int] = set()

    def track(self) -> set[int]:
        self.seen |= self.all_pids()
        return self.seen

    def close(self) -> None:
        self.track()
        super().close()


@pytest.fixture
def cluster(tmp_path):
    c = TrackedCluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.close()
        assert_all_gone(c.seen)


def dump_logs(cluster: Cluster, lines: int = 40) -> str:
    """The last lines of every process's output, for assertion messages."""
    parts = []
    for p in cluster.procs:
        parts.append(f"--- {p.name} (pid {p.pid}, rc {p.popen.poll()}) ---\n" + "".join(p.lines[-lines:]))
    return "\n".join(parts)
