"""peer.pipeline.checks: a trainer's own requests and a stage's answers."""

from __future__ import annotations

import pytest
import torch

from peer.net import RemoteError
from peer.pipeline.checks import MAX_LOSS, check_request, check_response
from protocol.spec import preset_spec

SPEC = preset_spec("tiny", stages=3)  # micro-batch 8 x 64, hidden 128
H = SPEC.model.hidden_size


def hidden(b=2, t=16):
    return torch.randn(b, t, H)


def test_honest_answers_pass():
    ids = torch.randint(0, 10, (2, 16))
    check_response(SPEC, 0, backward=False, sent={"inputs": ids}, loss=0.0, received={"outputs": hidden()})
    check_response(SPEC, 1, backward=False, sent={"inputs": hidden()}, loss=0.0, received={"outputs": hidden()})
    check_response(
        SPEC, 2, backward=False, sent={"inputs": hidden(), "labels": ids}, loss=3.2, received={"grad_inputs": hidden()}
    )
    check_response(
        SPEC, 1, backward=True, sent={"grad_outputs": hidden()}, loss=0.0, received={"grad_inputs": hidden()}
    )
    check_response(SPEC, 0, backward=True, sent={"grad_outputs": hidden()}, loss=0.0, received={})


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -1.0, MAX_LOSS * 10])
def test_a_loss_that_is_not_a_loss_is_a_bad_response(loss):
    with pytest.raises(RemoteError, match="is not a loss") as err:
        check_response(
            SPEC,
            2,
            backward=False,
            sent={"inputs": hidden(), "labels": torch.zeros(2, 16, dtype=torch.long)},
            loss=loss,
            received={"grad_inputs": hidden()},
        )
    assert err.value.code == "bad_response"


@pytest.mark.parametrize(
    "received,match",
    [
        ({"outputs": torch.randn(64, 16, H)}, "shape"),  # 32x the work for the next stage
        ({"outputs": torch.randn(2, 256, H)}, "shape"),
        ({}, "expected outputs"),
        ({"outputs": hidden(), "extra": hidden()}, "expected outputs"),
    ],
)
def test_outputs_must_have_the_shape_of_the_request(received, match):
    with pytest.raises(RemoteError, match=match):
        check_response(SPEC, 1, backward=False, sent={"inputs": hidden()}, loss=0.0, received=received)


def test_gradients_must_match_their_inputs():
    with pytest.raises(RemoteError, match="grad_inputs has shape"):
        check_response(
            SPEC, 1, backward=True, sent={"grad_outputs": hidden()}, loss=0.0, received={"grad_inputs": hidden(b=8)}
        )
    with pytest.raises(RemoteError, match="stage 0 returned"):
        check_response(
            SPEC, 0, backward=True, sent={"grad_outputs": hidden()}, loss=0.0, received={"grad_inputs": hidden()}
        )


def test_our_own_requests_are_checked_before_they_leave():
    check_request(SPEC, 1, {"inputs": hidden(b=8, t=64)})
    for bad in (hidden(b=9), hidden(t=65), torch.full((2, 16, H), float("nan"))):
        with pytest.raises(RemoteError) as err:
            check_request(SPEC, 1, {"inputs": bad})
        assert err.value.code == "bad_request"
