"""Single-process training (the swarm benchmark's baseline): it trains, and it reports honestly."""

from __future__ import annotations

import random

import pytest

from peer.dev.local_train import train_local
from protocol.spec import preset_spec


def _spec():
    # A tiny model on short sequences: a few hundred milliseconds per optimizer step on one core.
    return preset_spec(
        "tiny",
        stages=2,
        run_id="local-test",
        training=dict(micro_batch_size=4, seq_len=32, target_batch_size=8, lr=3e-3),
    )


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    words = "the swarm trains one model together and every peer holds a stage of it".split()
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(60)))
    return root


def test_loss_decreases(corpus):
    result = train_local(_spec(), corpus, steps=40, threads=1)
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
    a = train_local(_spec(), corpus, steps=6, threads=1, peer_key="k")
    b = train_local(_spec(), corpus, steps=6, threads=1, peer_key="k")
    c = train_local(_spec(), corpus, steps=6, threads=1, peer_key="other")
    assert a["losses"] == b["losses"]
    assert a["losses"] != c["losses"]


def test_bad_arguments(corpus):
    with pytest.raises(ValueError):
        train_local(_spec(), corpus, steps=0)
    with pytest.raises(ValueError):
        train_local(_spec(), corpus, steps=1, threads=0)
