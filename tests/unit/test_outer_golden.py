"""Golden figures of outer rounds' arithmetic: compression, encoding, robust aggregation and the
outer step on fixed inputs give the same bits as the tree that first pinned them.

Members of one stage group run different builds of swarmtrain; they agree on a round only when
every build turns the same contributions into the same weights, bit for bit. A refactoring that
changes any of these digests changes what peers compute together: it must not land without a
protocol version bump. The digests were taken on the tree before the second house pass
(commit 4889123) and must never be regenerated to make this test pass.
"""

from __future__ import annotations

import hashlib

import numpy as np

from peer.averaging.outer_step import OuterNesterov
from peer.averaging.robust import aggregate
from peer.averaging.sparse import SparseConfig, SparseUpdate, compress, decode_dense

CFG = SparseConfig(chunk=64, k=8, bits=2)
NUMEL = 64 * 40 + 17  # a partial last chunk on purpose


def sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def deltas(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(NUMEL).astype(np.float32)
    out = [(common + 0.5 * rng.standard_normal(NUMEL)).astype(np.float32) * np.float32(0.01) for _ in range(4)]
    out.append((-3.0 * common).astype(np.float32) * np.float32(0.01))  # points against the others
    out.append((40.0 * common).astype(np.float32) * np.float32(0.01))  # large: clipped to the median norm
    return out


def test_compression_and_encoding_are_pinned():
    error = np.zeros(NUMEL, dtype=np.float32)
    blobs = []
    for round_ in range(3):  # error feedback carries over from round to round
        update, error = compress(deltas(round_)[0], error, CFG)
        blobs.append(update.to_bytes())
        again = SparseUpdate.from_bytes(blobs[-1], numel=NUMEL, config=CFG)
        assert again.to_bytes() == blobs[-1]
    assert hashlib.sha256(b"".join(blobs)).hexdigest() == GOLDEN["blobs"]
    assert sha(error) == GOLDEN["error"]
    assert sha(decode_dense(SparseUpdate.from_bytes(blobs[-1], numel=NUMEL, config=CFG))) == GOLDEN["dense"]


def test_rounds_of_aggregation_and_outer_steps_are_pinned():
    base = np.random.default_rng(7).standard_normal(NUMEL).astype(np.float32)
    errors = [np.zeros(NUMEL, dtype=np.float32) for _ in range(6)]
    outer = OuterNesterov(lr=0.7, momentum=0.9)
    digests = []
    for round_ in range(4):
        updates, weights = {}, {}
        for member, delta in enumerate(deltas(100 + round_)):
            update, errors[member] = compress(delta, errors[member], CFG)
            blob = update.to_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            updates[digest] = SparseUpdate.from_bytes(blob, numel=NUMEL, config=CFG)
            weights[digest] = float(16 + 8 * member)
        claims = sorted(weights.values())
        result = aggregate(updates, weights, max_weight=2.0 * claims[(len(claims) - 1) // 2])
        base = outer.step(base, result.update)
        # What a member announces: the SHA-256 of its flat float32 base weights.
        digests.append(hashlib.sha256(base.tobytes()).hexdigest())
        assert len(result.dropped) == 1 and len(result.clipped) >= 1
    assert digests == GOLDEN["bases"]
    assert sha(outer.buffer) == GOLDEN["momentum"]


GOLDEN = {
    "blobs": "ccaf05a3cab8f907106f4710b0e8b055f31b78743e703c79be3ccb02bc4b9a87",
    "error": "570ebceca7c37578d2499523622136d8a1bbb752cc0057afbfe5b461e119915a",
    "dense": "f77139262bde9a2671895a792052f9ba823826a9f29a5d6ef6840bbe6c392a8c",
    "bases": [
        "8f176b879c56fccec3908a4d1aed195bfec33032e99e4556ff9de4d2d0114353",
        "b932f287b2ed2e119ea933cd620374f35aab24db42718336b2c6065e4c5c3a19",
        "5a7f773878acbcad03bb562e5d71a5ef46dce508846df7d4c58932bef8d9f08a",
        "1a25ddea307c9dfb8bde2e431a6b987bdbaa1ff8eab05682e34d84c29ace1778",
    ],
    "momentum": "3c7fc51eb2c3507468e1aedb5c9203f6c3fbc95a5d3b1a7cd233596c151553d7",
}
