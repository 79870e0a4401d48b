"""The keeper's checks without a network: a stage state's validation, the loss verdict, a
signing key the spec must trust, the group's epoch bound and when two states agree."""

from __future__ import annotations

import math

import pytest
import torch

from peer.checkpoints.keeper import check_signing_key, loss_verdict
from peer.checkpoints.state_pull import StateRejected, check_stage_state
from peer.model.llama import LlamaStage, stage_param_shapes
from protocol.codecs import encode
from protocol.spec import preset_spec


def _protos(tensors: dict) -> dict:
    return {k: encode(v, "none") for k, v in tensors.items()}


def test_check_stage_state(spec):
    good = dict(LlamaStage.from_spec(spec, 1).named_parameters())
    out = check_stage_state(spec, 1, _protos(good))
    assert set(out) == set(stage_param_shapes(spec, 1))
    assert all(torch.equal(out[k], good[k].detach()) for k in out)

    missing = dict(good)
    missing.pop("lm_head.weight")
    with pytest.raises(StateRejected, match="stage 1 state has the wrong tensors: missing lm_head.weight"):
        check_stage_state(spec, 1, _protos(missing), source="p")
    with pytest.raises(StateRejected, match="unexpected model.embed_tokens.weight"):
        check_stage_state(spec, 1, _protos({**good, "model.embed_tokens.weight": torch.zeros(3)}))
    wrong = {**good, "model.norm.weight": torch.ones(7)}
    with pytest.raises(StateRejected, match=r"model.norm.weight: shape \[7\] where \[128\] was expected"):
        check_stage_state(spec, 1, _protos(wrong))
    nan = {**good, "model.norm.weight": torch.full((128,), float("nan"))}
    with pytest.raises(StateRejected, match="model.norm.weight: contains NaN or infinite values"):
        check_stage_state(spec, 1, _protos(nan))
    ints = {**good, "model.norm.weight": torch.ones(128, dtype=torch.int64)}
    with pytest.raises(StateRejected, match="model.norm.weight: dtype torch.int64 where torch.float32 was expected"):
        check_stage_state(spec, 1, _protos(ints))


def test_loss_verdict():
    assert loss_verdict(3.0, 2.5) is None
    assert loss_verdict(3.0, None) is None
    assert "held-out loss is nan" in loss_verdict(math.nan, 2.0)
    why = loss_verdict(4.0, 2.0)
    assert "exploded: more than 1.5 x 2.0000 + 0.5 = 3.5000" in why


def test_signing_key_must_be_trusted(spec, keys):
    fp, warning = check_signing_key(spec, keys["keeper"][0])
    assert warning is None and len(fp) == 16
    with pytest.raises(ValueError, match="is not among the spec's trusted keys"):
        check_signing_key(spec, keys["mallory"][0])
    cosigned = preset_spec(
        "tiny",
        stages=2,
        trusted_keys=(keys["keeper"][1].read_text(), keys["mallory"][1].read_text()),
        trust=dict(min_signatures=2),
    )
    assert "requires 2 signatures" in check_signing_key(cosigned, keys["keeper"][0])[1]


def test_group_epoch_bound_and_agreement_rules():
    from peer.checkpoints.keeper import group_epoch_bound, states_agree

    assert group_epoch_bound([5, 5, 2**62]) == 6 and group_epoch_bound([7]) == 8 and group_epoch_bound([]) == 0
    a = (5, {"w": torch.zeros(100)}, "a")
    assert states_agree(a, (6, {"w": torch.full((100,), 1e-3)}, "b"), tolerance=4e-3)
    assert not states_agree(a, (5, {"w": torch.full((100,), 1.0)}, "b"), tolerance=4e-3)
    assert not states_agree(a, (7, {"w": torch.zeros(100)}, "b"), tolerance=4e-3)
    assert not states_agree(a, (5, {"v": torch.zeros(100)}, "b"), tolerance=4e-3)
