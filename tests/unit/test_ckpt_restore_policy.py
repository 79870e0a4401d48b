"""The checkpoint loading policy without a network: listing limits, restore candidates and
rollback, local refusals, the live-state verdict, announcements grouped by digest, the held step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer.checkpoints import CheckpointService, SourceFailed, live_state_verdict, restore_candidates
from peer.checkpoints.limits import check_listing, file_size_limits
from peer.checkpoints.store import CheckpointStore, LocalCheckpoint
from peer.model.llama import LlamaStage
from protocol.checkpoint import META_FILE, MODEL_FILE, CheckpointMeta
from protocol.records import CheckpointAnnouncement
from protocol.spec import preset_spec

from checkpoint_helpers import Events, announcement, copy_checkpoint, keeper_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spec, keys):
    """A signed checkpoint of stage 0, step 7 (about 1.7 MB), and its module."""
    return keeper_checkpoint(tmp_path_factory.mktemp("src"), spec, keys)


def test_listing_limits(spec):
    limits = file_size_limits(spec, 0)
    ok = {META_FILE: 300, MODEL_FILE: 1000, "signatures/0123456789abcdef.sig": 900}
    check_listing(ok, limits)
    with pytest.raises(SourceFailed, match=r"'\.\./\.\./etc/passwd', which is not part of a checkpoint"):
        check_listing({**ok, "../../etc/passwd": 10}, limits)
    with pytest.raises(SourceFailed, match="model.safetensors is .* bytes, more than"):
        check_listing({**ok, MODEL_FILE: limits[MODEL_FILE] + 1}, limits)
    with pytest.raises(SourceFailed, match="no signature"):
        check_listing({META_FILE: 1, MODEL_FILE: 1}, limits)
    with pytest.raises(SourceFailed, match="lacks model.safetensors"):
        check_listing({META_FILE: 1, "signatures/0123456789abcdef.sig": 1}, limits)


def _local(path, step, stage=0):
    meta = CheckpointMeta(run_id="r", spec_digest="0" * 64, stage=stage, step=step, tokens_seen=0, created=0.0)
    return LocalCheckpoint(path=Path(path), meta=meta, signers=("a" * 16,))


def _typed(announced):
    """(peer id, record) pairs as SwarmDHT.checkpoint_announcements returns them."""
    return [(peer, CheckpointAnnouncement.from_record(record)) for peer, record in announced]


def test_restore_candidates_order_and_rollback():
    d1, d2, d3 = "1" * 64, "2" * 64, "3" * 64
    local = [_local("/c/step-9", 9), _local("/c/step-3", 3)]
    announced = [
        ("peerA", announcement(9, d1)),
        ("peerB", announcement(12, d2)),
        ("peerC", announcement(12, d2)),
        ("peerD", announcement(2, d3)),
        ("me", announcement(50, "4" * 64)),
    ]
    got = restore_candidates(local, _typed(announced), held_step=3, exclude_sources=["me"])
    assert [(c.step, c.manifest, c.path) for c in got] == [
        (12, d2, None),
        (9, None, Path("/c/step-9")),
        (9, d1, None),
        (3, None, Path("/c/step-3")),
    ]
    assert got[0].sources == ("peerB", "peerC")
    # Announcements that do not claim a trusted signer are not worth a download.
    got = restore_candidates(
        [],
        _typed([("x", {**announcement(20, d3), "signers": ["b" * 16]}), ("y", announcement(9, d1))]),
        trusted={"a" * 16},
    )
    assert [c.manifest for c in got] == [d1]
    # The step of a digest is the smallest any announcer claims: lying about it does not help.
    got = restore_candidates([], _typed([("liar", announcement(99, d1)), ("honest", announcement(9, d1))]))
    assert [(c.step, c.sources) for c in got] == [(9, ("liar", "honest"))]


def test_live_state_verdict():
    v = dict(local_epoch=10, trusted_step=10, has_trusted_keys=True, accept_untrusted=True, max_lag=5)
    assert live_state_verdict(group_epoch=10, **v)[0] is False  # in step
    load, why = live_state_verdict(group_epoch=15, **v)
    assert load and "5 epoch(s) ahead of the trusted checkpoint (step 10)" in why
    load, why = live_state_verdict(group_epoch=16, **v)
    assert (
        not load and "6 epochs ahead of the trusted checkpoint (step 10), more than trust.max_live_state_lag = 5" in why
    )
    load, why = live_state_verdict(group_epoch=11, **{**v, "accept_untrusted": False})
    assert not load and "trust.accept_untrusted_live_state = false" in why
    # No checkpoint: the spec's init (step 0) is the trusted base.
    load, why = live_state_verdict(group_epoch=6, **{**v, "local_epoch": 0, "trusted_step": None})
    assert not load and "the spec's initialisation" in why
    # No trusted keys: nothing is more trusted than live state, no lag limit.
    assert live_state_verdict(group_epoch=1000, **{**v, "trusted_step": None, "has_trusted_keys": False})[0]


def test_restore_refusal_leaves_module_untouched(spec, ckpt, tmp_path):
    written, _ = ckpt
    root = tmp_path / "mine"
    tampered = copy_checkpoint(written.path, root)
    (tampered / META_FILE).write_text((tampered / META_FILE).read_text().replace('"step": 7', '"step": 70'))
    events = Events()
    service = CheckpointService(spec, CheckpointStore(root, spec), swarm=None, p2p=None, run=None, event=events)
    fresh = LlamaStage.from_spec(spec, 0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert service.restore(0, fresh) is None
    ((_, refused),) = events.named("checkpoint_refused")
    assert "checkpoint.json: content does not match the signed digest" in refused["reason"]
    assert events.named("restore_none")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_restore_without_trusted_keys_is_skipped(tmp_path):
    spec = preset_spec("tiny", stages=2)
    events = Events()
    service = CheckpointService(spec, CheckpointStore(tmp_path, spec), swarm=None, p2p=None, run=None, event=events)
    assert service.restore(0, LlamaStage.from_spec(spec, 0)) is None
    ((text, fields),) = events.named("restore_skipped")
    assert fields["reason"] == "no trusted keys"


def test_announced_checkpoints_grouped_by_digest():
    from peer.checkpoints import announced_checkpoints

    d1, d2 = "1" * 64, "2" * 64
    rows = announced_checkpoints(
        _typed(
            [
                ("keeper", {**announcement(9, d1), "stage": 0}),
                ("c", {**announcement(9, d1), "stage": 0}),
                ("keeper", {**announcement(12, d2), "stage": 0}),
                ("keeper", {**announcement(9, "3" * 64), "stage": 1}),
            ]
        )
    )
    assert [(r["stage"], r["step"], r["manifest_digest"], r["served_by"]) for r in rows] == [
        (0, 12, d2, ["keeper"]),
        (0, 9, d1, ["keeper", "c"]),
        (1, 9, "3" * 64, ["keeper"]),
    ]


def test_announcements_beyond_the_group_are_tried_last():
    """Hostile-peer finding 11: 20 fake announcements at a huge step no longer hide the real one."""
    real = "9" * 64
    fakes = [(f"fake{i}", announcement(2**31, f"{i:064x}")) for i in range(20)]
    got = restore_candidates([], _typed([*fakes, ("honest", announcement(9, real))]), step_bound=10)
    assert got[0].manifest == real and len(got) == 16
    # Without a bound (a stage with no peer online to say how far it got) the order is by step.
    assert restore_candidates([], _typed([*fakes, ("honest", announcement(9, real))]))[0].step == 2**31


def test_the_held_step_survives_a_restart(spec, tmp_path):
    store = CheckpointStore(tmp_path, spec)
    assert store.held_step(0) is None
    store.hold(0, 12)
    store.hold(0, 7)  # never lowered
    assert CheckpointStore(tmp_path, spec).held_step(0) == 12  # a new process, the same directory
    assert CheckpointStore(tmp_path, spec).held_step(1) is None
    (tmp_path / "stage-0" / "held-step").write_text("not a number")
    assert store.held_step(0) is None
