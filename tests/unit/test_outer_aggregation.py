"""Outer rounds' arithmetic: sparse low-bit pseudo-gradients (peer.averaging.sparse) and their
robust, reproducible aggregation (peer.averaging.robust)."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import torch

from peer.averaging.robust import (
    CENTERED_CLIP_ITERATIONS,
    OPPOSED_FROM,
    ROBUST_FROM,
    aggregate,
    dense_norm,
    update_norm,
)
from peer.averaging.sparse import (
    SparseConfig,
    SparseRejected,
    SparseUpdate,
    compress,
    decode_dense,
    encoded_size,
)

CFG = SparseConfig(chunk=64, k=8, bits=2)


def rand(n, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# --- compression -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [64, 1000, 4097])
def test_an_update_round_trips_through_its_bytes(bits, numel):
    cfg = SparseConfig(chunk=64, k=8, bits=bits)
    update, _ = compress(rand(numel, 1), np.zeros(numel, np.float32), cfg)
    data = update.to_bytes()
    assert len(data) == encoded_size(numel, cfg)
    back = SparseUpdate.from_bytes(data, numel=numel, config=cfg)
    assert np.array_equal(back.indices, update.indices) and np.array_equal(back.values, update.values)
    assert np.array_equal(back.scales, update.scales)
    assert back.to_bytes() == data


def test_the_k_largest_of_each_chunk_are_sent_and_the_rest_is_kept_as_error():
    delta = rand(256, 2)
    update, error = compress(delta, np.zeros_like(delta), CFG)
    chunks = delta.reshape(4, 64)
    for c in range(4):
        largest = set(np.argsort(-np.abs(chunks[c]), kind="stable")[:8].tolist())
        assert set(update.indices[c].tolist()) == largest
    # Nothing is lost: what was sent plus what is kept is what there was.
    assert np.allclose(decode_dense(update) + error, delta, atol=1e-6)


def test_error_feedback_sends_everything_eventually():
    """Over rounds, the sum of what was sent approaches the sum of the pseudo-gradients: the
    error buffer stays bounded instead of growing with the rounds."""
    n = 512
    error = np.zeros(n, np.float32)
    sent = np.zeros(n, np.float64)
    total = np.zeros(n, np.float64)
    for r in range(60):
        delta = rand(n, 100 + r, scale=0.01)
        total += delta
        update, error = compress(delta, error, CFG)
        sent += decode_dense(update)
    assert np.allclose(sent + error, total, atol=1e-4)
    assert np.linalg.norm(error) < 0.5 * np.linalg.norm(total)


def test_the_same_input_gives_the_same_bytes_with_ties():
    delta = np.ones(128, np.float32)  # every element ties: the lowest indices win
    a, _ = compress(delta, np.zeros_like(delta), CFG)
    b, _ = compress(delta.copy(), np.zeros_like(delta), CFG)
    assert a.to_bytes() == b.to_bytes()
    assert a.indices[0].tolist() == list(range(8))


def test_bytes_per_round_are_a_small_fraction_of_float32():
    numel = 1 << 20
    cfg = SparseConfig()  # the defaults: chunk 4096, k 32, 2 bits
    ratio = (4 * numel) / encoded_size(numel, cfg)
    assert ratio > 100, ratio  # 32 of 4096 at 14 bits each, plus a scale per chunk


def _valid(numel=256):
    update, _ = compress(rand(numel, 3), np.zeros(numel, np.float32), CFG)
    return update, update.to_bytes()


@pytest.mark.parametrize(
    "tamper,message",
    [
        (lambda d: d[:10], "shorter than the header"),
        (lambda d: b"XXXXX" + d[5:], "bad magic"),
        (lambda d: d + b"\0", "expected exactly"),
        (lambda d: d[:-1], "expected exactly"),
        (lambda d: struct.pack("<5sQIIB", b"STSP1", 250_000_000, 64, 8, 2) + d[22:], "expected 256"),
        (lambda d: d[:22] + struct.pack("<f", float("nan")) + d[26:], "not finite"),
        (lambda d: d[:22] + struct.pack("<f", -1.0) + d[26:], "negative"),
    ],
)
def test_hostile_bytes_are_refused_before_anything_is_decoded(tamper, message):
    _, data = _valid()
    with pytest.raises(SparseRejected, match=message):
        SparseUpdate.from_bytes(tamper(data), numel=256, config=CFG)


def test_indices_that_repeat_or_run_past_the_end_are_refused():
    update, _ = _valid(100)  # 2 chunks, the second 36 long
    bad = update.indices.copy()
    bad[0, 1] = bad[0, 0]
    forged = SparseUpdate(100, CFG, update.scales, bad, update.values).to_bytes()
    with pytest.raises(SparseRejected, match="strictly ascending"):
        SparseUpdate.from_bytes(forged, numel=100, config=CFG)
    bad = update.indices.copy()
    bad[1, -1] = 63  # past the 36 real elements of the last chunk, with a value
    values = update.values.copy()
    values[1, -1] = 1
    forged = SparseUpdate(100, CFG, update.scales, bad, values).to_bytes()
    with pytest.raises(SparseRejected, match="past the end"):
        SparseUpdate.from_bytes(forged, numel=100, config=CFG)


def test_a_value_outside_the_bit_range_is_refused():
    cfg = SparseConfig(chunk=64, k=8, bits=3)  # 3 bits hold 0..7, values are -3..3 (+3 on the wire)
    update, _ = compress(rand(64, 4), np.zeros(64, np.float32), cfg)
    values = update.values.copy()
    values[0, 0] = 4
    forged = SparseUpdate(64, cfg, update.scales, update.indices, values).to_bytes()
    with pytest.raises(SparseRejected, match="outside"):
        SparseUpdate.from_bytes(forged, numel=64, config=cfg)


# --- aggregation -----------------------------------------------------------------------------------


def contributions(n, numel=4096, seed=0):
    """Members' updates of one round: a direction they share plus their own (as the honest
    pseudo-gradients of a round are: pairwise cosines 0.02-0.2 measured on the tiny preset)."""
    out, shared = {}, rand(numel, 1000 + seed, scale=0.01)
    for i in range(n):
        delta = (0.5 * shared + rand(numel, seed + i, scale=0.01)).astype(np.float32)
        u, _ = compress(delta, np.zeros(numel, np.float32), SparseConfig(chunk=256, k=16))
        out[f"{i:02x}" * 32] = u
    return out


def reference(contribs, weights, max_weight):
    """A plain numpy reading of the policy (vectorised reductions, no care for bits)."""
    digests = sorted(contribs)
    dense = np.stack([decode_dense(contribs[d]) for d in digests])
    norms = np.linalg.norm(dense, axis=1)
    median = np.sort(norms)[(len(norms) - 1) // 2]
    dense = dense * np.minimum(1.0, median / norms)[:, None]
    if len(digests) >= OPPOSED_FROM:  # drop a minority that points against most of the others
        agree = (dense @ dense.T) > 0
        keep = [i for i in range(len(digests)) if 2 * (agree[i].sum() - agree[i, i]) >= len(digests) - 1]
        if len(keep) > len(digests) // 2:
            dense, digests = dense[keep], [digests[i] for i in keep]
    w = np.array([min(weights[d], max_weight) for d in digests])
    w = w / w.sum()
    center = (dense * w[:, None]).sum(axis=0)
    if len(digests) >= ROBUST_FROM:  # CenteredClip around the weighted mean, median radius
        for _ in range(CENTERED_CLIP_ITERATIONS):
            diffs = dense - center
            dist = np.linalg.norm(diffs, axis=1)
            tau = np.sort(dist)[(len(dist) - 1) // 2]
            center = center + (diffs * (w * np.minimum(1.0, tau / dist))[:, None]).sum(axis=0)
    return center


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_aggregation_matches_a_numpy_reference(n):
    contribs = contributions(n)
    weights = {d: 10.0 + i for i, d in enumerate(sorted(contribs))}
    got = aggregate(contribs, weights, max_weight=11.0)
    want = reference(contribs, weights, 11.0)
    assert np.allclose(got.update, want, rtol=1e-6, atol=1e-9)


def test_norms_are_exact_and_clipping_uses_the_median():
    contribs = contributions(3)
    for u in contribs.values():
        assert update_norm(u) == pytest.approx(np.linalg.norm(decode_dense(u)), rel=1e-12)
    norms = {d: update_norm(u) for d, u in contribs.items()}
    got = aggregate(contribs, {d: 1.0 for d in contribs}, max_weight=1.0)
    assert set(got.clipped) == {max(norms, key=norms.get)}


def test_dense_norms_are_a_sequential_sum():
    x = np.random.default_rng(3).standard_normal(100_003)
    assert dense_norm(x) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert dense_norm(np.zeros(0)) == 0.0


def test_most_of_a_sparse_round_survives_the_robust_mean():
    # Top-k contributions rarely share coordinates: a coordinate-wise trimmed mean would zero
    # nearly all of them; CenteredClip keeps the honest mean's direction and most of its size.
    contribs = contributions(6)
    weights = {d: 1.0 for d in contribs}
    got = aggregate(contribs, weights, max_weight=1.0).update
    mean = np.mean([decode_dense(u) for u in contribs.values()], axis=0)
    cos = got @ mean / np.linalg.norm(got) / np.linalg.norm(mean)
    assert cos > 0.95 and np.linalg.norm(got) > 0.7 * np.linalg.norm(mean), (cos, np.linalg.norm(got))


def test_the_same_bits_in_any_order_and_with_any_thread_count():
    contribs = contributions(5)
    weights = {d: 1.0 for d in contribs}
    results = set()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for perm in itertools.islice(itertools.permutations(sorted(contribs)), 0, 120, 17):
            shuffled = {d: contribs[d] for d in perm}
            results.add(aggregate(shuffled, weights, max_weight=1.0).update.tobytes())
    torch.set_num_threads(1)
    assert len(results) == 1


def test_one_poisoned_contribution_of_five_barely_moves_the_result():
    contribs = contributions(5)
    honest = aggregate({d: contribs[d] for d in sorted(contribs)[:4]}, {d: 1.0 for d in contribs}, max_weight=1.0)
    # The fifth member sends its update sign-flipped and scaled 10x (the biggest scale the codec allows).
    d5 = sorted(contribs)[4]
    u = contribs[sorted(contribs)[0]]
    contribs[d5] = SparseUpdate(u.numel, u.config, u.scales * 10, u.indices, (-u.values).astype(np.int8))
    got = aggregate(contribs, {d: 1.0 for d in contribs}, max_weight=1.0)
    assert got.dropped == {d5: "points against most of the others"}
    drift = np.linalg.norm(got.update - honest.update) / np.linalg.norm(honest.update)
    naive = np.mean([decode_dense(contribs[d]) for d in contribs], axis=0)
    naive_drift = np.linalg.norm(naive - honest.update) / np.linalg.norm(honest.update)
    assert naive_drift > 2 and drift < naive_drift / 3, (drift, naive_drift)


def test_a_scaled_contribution_of_three_is_clipped_and_a_flipped_one_dropped():
    contribs = contributions(3)
    a, b, c = sorted(contribs)
    u = contribs[c]
    contribs[c] = SparseUpdate(u.numel, u.config, u.scales * 10, u.indices, u.values)
    got = aggregate(contribs, {d: 1.0 for d in contribs}, max_weight=1.0)
    assert got.clipped == (c,) and not got.dropped
    contribs[c] = SparseUpdate(u.numel, u.config, u.scales * 10, u.indices, (-u.values).astype(np.int8))
    got = aggregate(contribs, {d: 1.0 for d in contribs}, max_weight=1.0)
    assert got.used == (a, b) and set(got.dropped) == {c}


def test_non_finite_and_weightless_contributions_are_dropped():
    contribs = contributions(3)
    bad, zero, good = sorted(contribs)
    u = contribs[bad]
    contribs[bad] = SparseUpdate(u.numel, u.config, np.full_like(u.scales, np.nan), u.indices, u.values)
    got = aggregate(contribs, {bad: 1.0, zero: 0.0, good: 1.0}, max_weight=1.0)
    assert got.used == (good,) and set(got.dropped) == {bad, zero}
    assert np.isfinite(got.update).all()
    with pytest.raises(ValueError, match="no usable contribution"):
        aggregate({bad: contribs[bad]}, {bad: 1.0}, max_weight=1.0)


def test_claimed_weights_count_up_to_the_cap():
    contribs = contributions(2)
    a, b = sorted(contribs)
    capped = aggregate(contribs, {a: 1e9, b: 10.0}, max_weight=10.0).update
    even = aggregate(contribs, {a: 1.0, b: 1.0}, max_weight=10.0).update
    assert np.array_equal(capped, even)
