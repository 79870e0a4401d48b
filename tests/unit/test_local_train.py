"""Single-process training (the swarm benchmark's baseline): it trains, and it reports honestly."""

from __future__ import annotations

import pytest

from peer.dev.local_train import train_local

from conftest import local_train_spec


def test_loss_decreases(corpus):
    result = train_local(local_train_spec(), corpus, steps=40, threads=1)
    losses = result["losses"]
    assert len(losses) == 40 and result["microbatches"] == 40
    assert result["tokens"] == 40 * 4 * 32
    assert result["optimizer_steps"] == 20  # target 8 samples / micro-batch 4: one step per 2
    assert result["tokens_per_s"] > 0
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert result["final_loss"] == pytest.approx(sum(losses[-10:]) / 10)


def test_same_data_key_same_run(corpus):
    """The data order is a function of the key (a swarm trainer's peer id gives its batches)."""
    a = train_local(local_train_spec(), corpus, steps=6, threads=1, peer_key="k")
    b = train_local(local_train_spec(), corpus, steps=6, threads=1, peer_key="k")
    c = train_local(local_train_spec(), corpus, steps=6, threads=1, peer_key="other")
    assert a["losses"] == b["losses"]
    assert a["losses"] != c["losses"]


def test_bad_arguments(corpus):
    with pytest.raises(ValueError):
        train_local(local_train_spec(), corpus, steps=0)
    with pytest.raises(ValueError):
        train_local(local_train_spec(), corpus, steps=1, threads=0)
