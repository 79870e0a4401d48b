"""A peer of this tree trains with a peer of the tree before it: nothing a peer says or stores
changed in the second house pass (the wire, DHT records, spec digests, outer rounds' arithmetic).

The tree before is taken from git (``git archive``) and run with this checkout's Python and
packages. A bootstrap and a trainer of this tree, and stage 1 served by two members, one of each
tree, in outer mode: the trainer's micro-batches go through both, and the two members complete
rounds together with both contributions and the same bits.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import dump_logs, make_tiny_spec, write_text_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "4889123"  # main before the second house pass (issue 24)
OUTER = dict(round_seconds=20.0, gather_seconds=6.0, agree_seconds=4.0, chunk=256, k=16, bits=2)


@pytest.fixture(scope="module")
def tree_before(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tree-before")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BEFORE, "peer", "protocol"], capture_output=True, timeout=120
    )
    assert archive.returncode == 0, (
        f"the tree before ({BEFORE}) is not in this checkout's history (a shallow clone?): "
        + archive.stderr.decode(errors="replace")
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
    return dest


def test_a_peer_of_the_tree_before_trains_and_averages_with_this_one(cluster, tmp_path, tree_before):
    spec = make_tiny_spec(run_id="compat", averaging="outer", outer=OUTER)
    spec_path = tmp_path / "spec.toml"
    spec.save(spec_path)
    data = write_text_data(tmp_path / "data", files=3)
    before = ["env", f"PYTHONPATH={tree_before}", sys.executable, "-m", "peer.cli"]
    _, addr = cluster.bootstrap(spec_path=spec_path, timeout=240)
    old = cluster.peer("old", [addr], spec_path=spec_path, stage=1, command=before)
    new = cluster.peer("new", [addr], spec_path=spec_path, stage=1)
    for p in (old, new):
        p.wait_event("ready", 240)
    trainer = cluster.peer("trainer", [addr], spec_path=spec_path, stage=0, data=str(data))
    trainer.wait_event("ready", 240)
    cluster.track()
    for p in (old, new):
        p.wait_event("outer_round", 300, lambda e: e["epoch"] >= 4)
    rounds = [{e["round"]: e for e in p.events if e.get("event") == "outer_round"} for p in (old, new)]
    common = set(rounds[0]) & set(rounds[1])
    assert len(common) >= 3, (rounds, dump_logs(cluster))
    assert all(rounds[0][r]["digest"] == rounds[1][r]["digest"] for r in common), rounds
    assert sum(rounds[0][r]["contributions"] == 2 for r in common) >= 3, rounds
    for p in (old, new):  # both trees served the trainer's micro-batches
        assert p.wait_event("status", 60, lambda e: e.get("served", 0) > 0)["served"] > 0
    assert trainer.last_event("status")["retries"] <= 3, dump_logs(cluster)
