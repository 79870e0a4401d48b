"""``swarmtrain teach`` in a subprocess: exit codes and messages of the checks it makes before it
joins anything."""

from __future__ import annotations

import pytest

from protocol.spec import preset_spec

from teach_helpers import distill_spec

pytestmark = pytest.mark.timeout(300)


def test_swarmtrain_teach_refuses_before_joining_anything(teacher_dir, tmp_path):
    """Exit codes and messages of the command, with an initial peer that does not exist: the
    checks come before any network."""
    import subprocess
    import sys

    nowhere = "/ip4/127.0.0.1/tcp/9/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"

    def teach(spec, *extra):
        path = tmp_path / "spec.toml"
        spec.save(path)
        cmd = [sys.executable, "-m", "peer.cli", "teach", "--model", str(teacher_dir), "--spec", str(path)]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)

    out = teach(distill_spec())
    assert out.returncode == 2 and "--initial-peers is required" in out.stderr
    out = teach(preset_spec("tiny", run_id="plain"), "--initial-peers", nowhere)
    assert out.returncode == 2 and "does not distill" in out.stderr and "spec init --distill" in out.stderr
    out = teach(distill_spec(teacher_digests=["0" * 64]), "--initial-peers", nowhere)
    assert out.returncode == 1 and "not among the teachers" in out.stderr, out.stderr[-2000:]
