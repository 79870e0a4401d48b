"""Fixtures and helpers shared by the test files of every tree (tests/unit: no processes, no
sockets; tests/integration: real processes and daemons; tests/hostile, tests/netlab). Helper
modules of single topics are in tests/helpers/, which this file puts on sys.path.

Specs and keys:
- ``tiny_spec`` / ``spec_path``: the tiny preset (2 stages) with test-speed averaging, saved as
  TOML for ``--spec`` (``make_tiny_spec`` for variants);
- ``keys``: signing key pairs by name (a, b, keeper, mallory), made once a session;
- ``spec``: the tiny preset (2 stages) trusting the keeper's key (``spec_trusting`` for others).
  A test file that means another spec by ``spec`` defines its own fixture, which pytest prefers;
- ``local_train_spec``: the spec of the single-process training tests.

Data and directories:
- ``text_data``: a directory of generated, learnable text (a loss curve shows within seconds);
- ``corpus``: a small seeded corpus of words (``write_word_docs``) for single-process training;
- ``model_dir``: a directory of files (nested, binary and text) to sign;
- ``teacher_dir``: an untrained teacher exported as a Hugging Face directory.

Processes:
- ``cluster``: a ``peer.dev.launcher.Cluster`` in ``tmp_path`` that is always closed, and that
  checks afterwards that none of its processes (peers, bootstrap, p2pd, hivemind's helpers)
  is left alive;
- ``assert_all_gone``: the same check for any set of pids;
- ``host`` / ``client``: p2pd daemons on 127.0.0.1 in one loop thread, and the test's own;
- ``wait_until``: poll state that other threads or processes update, with a deadline.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"  # modules the tests import (checkpoint_helpers, outer_helpers, ...)
for _path in (HELPERS, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("OMP_NUM_THREADS", "1")

from peer.base.procs import alive  # noqa: E402
from peer.dev.launcher import Cluster  # noqa: E402
from protocol import signing  # noqa: E402
from protocol.spec import RunSpec, preset_spec  # noqa: E402

T = TypeVar("T")

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


KEY_NAMES = ("a", "b", "keeper", "mallory")


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path, str]]:
    """Signing key pairs by name: (private .pem, public .pub, fingerprint). Tests only read them."""
    directory = tmp_path_factory.mktemp("keys")
    return {name: signing.write_keypair(directory / f"{name}.pem") for name in KEY_NAMES}


def spec_trusting(keys: dict, *names: str, **fields) -> RunSpec:
    """The tiny preset, 2 stages, whose trusted keys are the named ones of ``keys``."""
    return preset_spec("tiny", stages=2, trusted_keys=tuple(keys[n][1].read_text() for n in names), **fields)


@pytest.fixture(scope="session")
def spec(keys) -> RunSpec:
    """The tiny preset (2 stages) trusting the keeper's key: the keeper and checkpoint-transfer tests."""
    return spec_trusting(keys, "keeper")


def local_train_spec() -> RunSpec:
    """A tiny model on short sequences: a few hundred milliseconds per optimizer step on one core."""
    return preset_spec(
        "tiny",
        stages=2,
        run_id="local-test",
        training=dict(micro_batch_size=4, seq_len=32, target_batch_size=8, lr=3e-3),
    )


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


def write_word_docs(root: Path, words: list[str], *, files: int, lines: int, per_line: int, seed: int = 0) -> Path:
    """``files`` documents doc0.txt, doc1.txt, ... of ``lines`` lines of ``per_line`` words drawn
    (seeded) from ``words``."""
    rng = random.Random(seed)
    root.mkdir()
    for i in range(files):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(per_line)) for _ in range(lines))
        (root / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture()
def corpus(tmp_path) -> Path:
    words = "the swarm trains one model together and every peer holds a stage of it".split()
    return write_word_docs(tmp_path / "corpus", words, files=4, lines=60, per_line=10)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (d / "config.json").write_text('{"a": 1}\n')
    (d / "sub").mkdir()
    (d / "sub" / "extra.txt").write_text("nested files are signed too\n")
    return d


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from teach_helpers import untrained_teacher

    return untrained_teacher(tmp_path_factory.mktemp("teacher") / "hf")


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


@pytest.fixture(scope="module")
def host():
    """A loop thread for p2pd daemons on 127.0.0.1 (``checkpoint_helpers.P2PHost``), all of them
    stopped after the module."""
    from checkpoint_helpers import P2PHost

    h = P2PHost()
    yield h
    h.close()


@pytest.fixture(scope="module")
def client(host):
    """A p2pd of ``host``: where the test's own calls come from."""
    return host.new()


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    poll: float = 1.0,
    cluster: Optional[TrackedCluster] = None,
) -> T:
    """Poll ``condition`` (state that other threads or processes update, not a sleep for
    readiness) until it returns something truthy, and return that. After ``timeout`` seconds an
    AssertionError names ``what`` and the last value. With ``cluster``, a process of it that exits
    meanwhile (``status`` excepted) fails the wait at once, and a failure carries their logs."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            logs = "" if cluster is None else "\n" + dump_logs(cluster)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}{logs}")
        if cluster is not None:
            cluster.track()
            dead = [p.name for p in cluster.procs if p.name != "status" and not p.alive()]
            assert not dead, f"{dead} exited while waiting for {what}\n" + dump_logs(cluster)
        time.sleep(poll)


def dump_logs(cluster: Cluster, lines: int = 40) -> str:
    """The last lines of every process's output, for assertion messages."""
    parts = []
    for p in cluster.procs:
        parts.append(f"--- {p.name} (pid {p.pid}, rc {p.popen.poll()}) ---\n" + "".join(p.lines[-lines:]))
    return "\n".join(parts)
