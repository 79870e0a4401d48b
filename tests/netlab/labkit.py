"""What the network-lab test modules share: their marks (``netlab``, a timeout, and a skip that
says why when this machine cannot run the lab: no root, ``ip``, ``tc`` or ``nft``; CI has root
and installs the tools, so there a missing one is an error, not a skip), a bootstrap on a lab
host, and the check that two members of a stage completed rounds together with the same bits."""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peer.dev import lab as netlab
from peer.dev.launcher import SWARMTRAIN

from conftest import TrackedCluster, assert_all_gone, dump_logs, make_tiny_spec, write_text_data

# 30 s rounds: a joiner reads its group's round state between two rounds, and on a 10 Mbit/s uplink
# the 5 s a 20 s round leaves (after 6 s gathering, 4 s agreeing and 5 s of margin) is too short.
OUTER = dict(round_seconds=30.0, gather_seconds=6.0, agree_seconds=4.0, chunk=256, k=16, bits=2)


def lab_marks(timeout: float) -> list:
    why = netlab.missing()
    if why and os.environ.get("CI") == "true":
        raise RuntimeError(f"the network lab cannot run in CI: {why}")
    marks = [pytest.mark.netlab, pytest.mark.timeout(timeout)]
    if why:
        marks.append(pytest.mark.skip(reason=why))
    return marks


@dataclass
class LabSwarm:
    """A lab, a tiny outer-mode spec with its data, and the swarm's processes."""

    tmp_path: Path
    lab: "netlab.Lab"
    cluster: TrackedCluster
    spec_path: Path
    data: Path
    addr: str = ""  # the bootstrap's multiaddr, once started
    peers: dict = field(default_factory=dict)

    def start_bootstrap(self, host) -> str:
        """A bootstrap (relaying, as by default) on ``host``; its multiaddr on the lab's switch."""
        boot = self.cluster.start(
            "boot",
            ["bootstrap", "--host-maddrs", f"/ip4/{host.addr}/tcp/31337", "--identity",
             str(self.tmp_path / "boot.id"), "--log-json", "--spec", str(self.spec_path)],
            command=host.exec_prefix() + SWARMTRAIN,
        )  # fmt: skip
        self.addr = next(m for m in boot.wait_event("ready", 240)["maddrs"] if host.addr in m)
        return self.addr

    def start_peer(self, name: str, host, stage: int, *, data: bool):
        """``swarmtrain run`` on ``host`` with the defaults ``spec init`` writes: no timeout flags."""
        args = ["run", "--log-json", "--threads", "1", "--initial-peers", self.addr, "--spec", str(self.spec_path),
                "--stage", str(stage)] + (["--data", str(self.data)] if data else [])  # fmt: skip
        self.peers[name] = self.cluster.start(name, args, command=host.exec_prefix() + SWARMTRAIN)
        return self.peers[name]


@contextlib.contextmanager
def lab_swarm(tmp_path: Path, run_id: str):
    """A ``LabSwarm``; on failure the processes' last log lines are printed, and every process,
    namespace and interface is gone afterwards."""
    spec_path = tmp_path / "spec.toml"
    make_tiny_spec(run_id=run_id, averaging="outer", outer=OUTER).save(spec_path)
    data = write_text_data(tmp_path / "data", files=3)
    cluster = TrackedCluster(tmp_path / "cluster")
    lab = netlab.Lab()
    try:
        yield LabSwarm(tmp_path, lab, cluster, spec_path, data)
    except (AssertionError, TimeoutError, RuntimeError, subprocess.TimeoutExpired):
        print(dump_logs(cluster, 60))
        raise
    finally:
        cluster.close()
        lab.close()
        assert_all_gone(cluster.seen)


def assert_rounds_agree(peers, pair, at_least: int = 3) -> None:
    """The two members of ``pair`` logged ``at_least`` common rounds, each with the same digest,
    and that many with both contributions."""
    rounds = [{e["round"]: e for e in peers[n].events if e.get("event") == "outer_round"} for n in pair]
    common = set(rounds[0]) & set(rounds[1])
    assert len(common) >= at_least, rounds
    assert all(rounds[0][r]["digest"] == rounds[1][r]["digest"] for r in common), rounds
    assert sum(rounds[0][r]["contributions"] == 2 for r in common) >= at_least, rounds
