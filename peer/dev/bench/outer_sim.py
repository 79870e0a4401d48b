"""A stage group's averaging, simulated in one process with the production arithmetic.

``peer.dev.bench.outer`` compares outer rounds with per-step averaging on held-out loss at an equal
number of tokens, with and without a poisoned member. Doing that in real swarms would take
hours on two cores (3 seeds x 2 modes x 5 attacks x 20 rounds), so the members of a group live
in one process here, one after the other, and everything that decides the weights is the code
the peers run:

- outer: each member trains its own copy with the spec's inner optimizer
  (``peer.averaging.outer.inner_optimizer``, gradients clipped as ``OuterOptimizer.step`` clips
  them); every ``inner_steps`` micro-batches, per stage, it compresses its pseudo-gradient with
  error feedback (``sparse.compress``), the bytes go through ``SparseUpdate.to_bytes`` /
  ``from_bytes`` (bytes that do not decode are held by nobody, as in ``rounds.run_round``), and
  *each member* aggregates the set (``robust.aggregate``, the cap at twice the median claim as in
  ``run_round``) with the contributions given in its own random order and applies
  ``OuterNesterov``: the benchmark then checks that every member holds the same bits;
- per_step: one set of weights (every member of a per-step group applies the same averaged
  gradients), the spec's optimizer and LR schedule (``make_torch_optimizer``, ``lr_lambda``);
  every step each member computes the gradient of its micro-batch, each part goes through
  hivemind's serialization with the codec (``serialize_torch_tensor``/``deserialize_torch_tensor``)
  and enters the average as the peer's guard lets it (``averaging.guards.guarded_part``: a part
  that is not finite counts with weight 0).

What it leaves out: routing between the members of different stages (member i's stage 0
always feeds member i's stage 1), the progress a member makes while a round is on the wire, and
the network (bytes are counted from the real messages, see ``outer_round_bytes``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from typing import Callable, Optional, Sequence

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto.runtime_pb2 import CompressionType

from peer.averaging.contribution import Contribution, Holding
from peer.averaging.guards import guarded_part
from peer.averaging.optimizer import lr_lambda, make_torch_optimizer
from peer.averaging.outer import inner_optimizer
from peer.averaging.outer_step import OuterNesterov
from peer.averaging.robust import aggregate
from peer.averaging.rounds import POLL_S
from peer.averaging.sparse import SparseConfig, SparseRejected, SparseUpdate, compress
from peer.data import PackedDataset
from peer.data.tokenizer import load_tokenizer
from peer.model.llama import build_stages, causal_lm_loss, chain_forward
from protocol import records
from protocol.messages_pb2 import OuterRequest, OuterResponse
from protocol.spec import RunSpec

ATTACKS = ("sign_flip_x10", "noise", "nan", "constant")
CODECS = {"none": CompressionType.NONE, "blockwise8bit": CompressionType.BLOCKWISE_8BIT}
POISON_SCALE = 10.0  # noise and constant attacks: ten times the honest norm, as the sign flip


@dataclasses.dataclass
class RunResult:
    loss: float  # held-out label cross-entropy of the final weights
    tokens: int
    averaging_bytes: float  # everything the group sent for averaging, summed over members
    rounds: int = 0  # outer rounds, or per-step optimizer steps
    identical_rounds: int = 0  # outer: rounds after which every member held the same bits
    dropped: int = 0  # contributions (outer) or parts (per_step) left out
    clipped: int = 0
    finite: bool = True
    seconds: float = 0.0


def _stage_params(stage: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in stage.parameters() if p.requires_grad]


def _flat(params: Sequence[torch.Tensor], grads: bool = False) -> np.ndarray:
    parts = [(p.grad if grads else p).detach().reshape(-1).float() for p in params]
    return torch.cat(parts).numpy().copy()


def _set_flat(params: Sequence[torch.nn.Parameter], flat: np.ndarray, grads: bool = False) -> None:
    offset = 0
    with torch.no_grad():
        for p in params:
            piece = torch.from_numpy(flat[offset : offset + p.numel()]).view_as(p).clone()
            if grads:
                p.grad = piece
            else:
                p.copy_(piece)
            offset += p.numel()


class Members:
    """``n`` members of a group, each with its own data stream and copy of every stage."""

    def __init__(self, spec: RunSpec, data: str, suffixes, n: int, seed: int):
        self.spec = spec
        torch.manual_seed(seed)
        template = build_stages(spec)
        self.models = [copy.deepcopy(template) for _ in range(n)]
        t = spec.training
        tokenizer = load_tokenizer(spec.tokenizer)
        self.streams = [
            PackedDataset(
                data,
                tokenizer,
                seq_len=t.seq_len,
                batch_size=t.micro_batch_size,
                seed=seed,
                peer_key=f"member-{i}",
                suffixes=suffixes,
            )
            for i in range(n)
        ]
        self.tokens = 0

    def backward(self, i: int, stages: Optional[list] = None) -> None:
        """One micro-batch of member ``i`` through ``stages`` (default: its own copy)."""
        batch = next(self.streams[i])
        stages = stages if stages is not None else self.models[i]
        causal_lm_loss(chain_forward(stages, batch), batch).backward()
        self.tokens += batch.numel()


@torch.no_grad()
def heldout_loss(stages, batches) -> float:
    for s in stages:
        s.eval()
    losses = [float(causal_lm_loss(chain_forward(stages, b), b)) for b in batches]
    for s in stages:
        s.train()
    return sum(losses) / len(losses)


# --- poisoned members ---------------------------------------------------------------------------


def poison_vector(attack: str, honest: np.ndarray, direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a poisoned member sends instead of ``honest`` (a pseudo-gradient or a gradient).
    ``direction``: a fixed unit vector, the same every round (the constant attack)."""
    norm = float(np.linalg.norm(honest)) or 1.0
    if attack == "sign_flip_x10":
        return (-POISON_SCALE * honest).astype(np.float32)
    if attack == "noise":
        noise = rng.standard_normal(honest.size).astype(np.float32)
        return (noise * (POISON_SCALE * norm / float(np.linalg.norm(noise)))).astype(np.float32)
    if attack == "constant":
        return (direction * (POISON_SCALE * norm)).astype(np.float32)
    if attack == "nan":
        return np.full_like(honest, np.nan)
    raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


def _unit(size: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    return v / np.float32(np.linalg.norm(v))


# --- bytes ----------------------------------------------------------------------------------


def outer_round_bytes(blob_sizes: Sequence[int], *, gather_s: float, agree_s: float, poll_s: float = POLL_S) -> dict:
    """Bytes a group of ``len(blob_sizes)`` members sends in one round of one stage, from the real
    messages of ``rounds.run_round``: every contribution fetched by each other member (request and
    response), and the DHT traffic: each member stores one contribution record and one holding
    record (to up to 5 DHT replicas, hivemind's default), and reads the round's records every
    ``poll_s`` (contributions while it gathers, contributions and holdings while it agrees; one
    response holding every member's record a read)."""
    n = len(blob_sizes)
    key = _FakeKey()
    rpc = 0
    for size in blob_sizes:
        request = OuterRequest(run="r" * 40, stage=0, round=1 << 20, digest="d" * 64).ByteSize()
        response = OuterResponse(data=b"\0" * size).ByteSize()
        rpc += (n - 1) * (request + response)
    contribution = len(msgpack.packb(key.contribution_record(), use_bin_type=True))
    holding = len(msgpack.packb(key.holding_record(n), use_bin_type=True))
    replicas = min(5, n)
    stores = n * replicas * (contribution + holding)
    reads = (
        n * n * (math.ceil(gather_s / poll_s) * contribution + math.ceil(agree_s / poll_s) * (contribution + holding))
    )
    return {"rpc": rpc, "dht_stores": stores, "dht_reads": reads, "total": rpc + stores + reads}


class _FakeKey:
    """Record sizes as a real member signs them (an RSA-2048 key, hivemind's)."""

    def __init__(self):
        from hivemind.utils.crypto import RSAPrivateKey

        self.key = RSAPrivateKey()
        self.peer_id = "Qm" + "x" * 44

    def contribution_record(self) -> dict:
        c = Contribution.sign(self.key, run="r" * 40, stage=0, round_=1, author=self.peer_id, weight=1.0, blob=b"x")
        return records.OuterContributionModel(
            author=c.author, weight=c.weight, digest=c.digest, nbytes=1, public_key=c.public_key, signature=c.signature
        ).dict()

    def holding_record(self, n: int) -> dict:
        h = Holding.sign(self.key, run="r" * 40, stage=0, round_=1, member=self.peer_id, digests=["d" * 64] * n)
        return records.OuterHoldingModel(
            member=h.member, digests=list(h.digests), public_key=h.public_key, signature=h.signature
        ).dict()


def per_step_bytes(grads: Sequence[torch.Tensor], codec: str, n: int) -> int:
    """Bytes a group of ``n`` sends in one butterfly all-reduce of these gradients (hivemind's:
    each member sends (n-1)/n of every tensor to the other reducers and gets back the averaged
    parts, so 2(n-1) serialized copies in all), from hivemind's serialized messages."""
    size = sum(serialize_torch_tensor(g, CODECS[codec]).ByteSize() for g in grads)
    return 2 * (n - 1) * size


# --- the two modes ------------------------------------------------------------------------------


def run_per_step(
    spec: RunSpec,
    data: str,
    suffixes,
    *,
    members: int,
    steps: int,
    seed: int,
    eval_batches,
    codec: str = "none",
    attack: Optional[str] = None,
    progress: Callable[[str], None] = lambda s: None,
) -> RunResult:
    group = Members(spec, data, suffixes, members, seed)
    model = group.models[0]  # every member of a per-step group applies the same step
    params = [_stage_params(s) for s in model]
    optimizers = [make_torch_optimizer(p, spec.training) for p in params]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(spec.training)) for o in optimizers]
    directions = [_unit(sum(p.numel() for p in ps), 1000 + k) for k, ps in enumerate(params)]
    rng = np.random.default_rng(seed + 99)
    result = RunResult(loss=math.nan, tokens=0, averaging_bytes=0.0)
    for step in range(steps):
        parts: list[list[tuple[np.ndarray, float]]] = [[] for _ in params]
        for i in range(members):
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            group.backward(i, model)
            for k, ps in enumerate(params):
                g = _flat(ps, grads=True)
                if attack is not None and i == members - 1:
                    g = poison_vector(attack, g, directions[k], rng)
                sent = deserialize_torch_tensor(serialize_torch_tensor(torch.from_numpy(g), CODECS[codec]))
                part, weight = guarded_part(sent, float(spec.training.micro_batch_size))
                result.dropped += int(weight == 0)
                parts[k].append((part.float().numpy().astype(np.float64), weight))
        for k, ps in enumerate(params):
            total = sum(w for _, w in parts[k])
            mean = sum(x * w for x, w in parts[k]) / total if total else np.zeros_like(parts[k][0][0])
            _set_flat(ps, mean.astype(np.float32), grads=True)
            result.averaging_bytes += per_step_bytes([torch.from_numpy(mean.astype(np.float32))], codec, members)
            optimizers[k].step()
            schedulers[k].step()
        result.rounds += 1
        if (step + 1) % max(1, steps // 4) == 0:
            progress(f"step {step + 1}/{steps}")
    result.tokens = group.tokens
    result.finite = all(bool(torch.isfinite(p).all()) for ps in params for p in ps)
    result.loss = heldout_loss(model, eval_batches) if result.finite else math.nan
    return result


def run_outer(
    spec: RunSpec,
    data: str,
    suffixes,
    *,
    members: int,
    rounds: int,
    inner_steps: int,
    seed: int,
    eval_batches,
    attack: Optional[str] = None,
    progress: Callable[[str], None] = lambda s: None,
) -> RunResult:
    o = spec.training.outer
    config = SparseConfig(chunk=o.chunk, k=o.k, bits=o.bits)
    group = Members(spec, data, suffixes, members, seed)
    params = [[_stage_params(s) for s in m] for m in group.models]  # [member][stage]
    inner = [[inner_optimizer(spec, ps) for ps in per_member] for per_member in params]
    stages = range(len(params[0]))
    bases = [[_flat(params[i][k]) for k in stages] for i in range(members)]
    errors = [[np.zeros_like(bases[i][k]) for k in stages] for i in range(members)]
    outers = [[OuterNesterov(lr=o.outer_lr, momentum=o.outer_momentum) for _ in stages] for _ in range(members)]
    directions = [_unit(bases[0][k].size, 1000 + k) for k in stages]
    rng = np.random.default_rng(seed + 99)
    weight = float(inner_steps * spec.training.micro_batch_size)
    clip = spec.training.grad_clip or math.inf
    result = RunResult(loss=math.nan, tokens=0, averaging_bytes=0.0)
    for r in range(rounds):
        for _ in range(inner_steps):
            for i in range(members):
                for opt in inner[i]:
                    opt.zero_grad(set_to_none=True)
                group.backward(i)
                for k in stages:
                    torch.nn.utils.clip_grad_norm_(params[i][k], clip)
                    inner[i][k].step()
        identical = True
        for k in stages:
            blobs = []
            for i in range(members):
                delta = bases[i][k] - _flat(params[i][k])
                if attack is not None and i == members - 1:
                    update, _ = compress(
                        np.nan_to_num(poison_vector(attack, delta, directions[k], rng)), np.zeros_like(delta), config
                    )
                    if attack == "nan":  # a well-formed update whose scales are NaN
                        update = dataclasses.replace(update, scales=np.full_like(update.scales, np.nan))
                else:
                    update, errors[i][k] = compress(delta, errors[i][k], config)
                blobs.append(update.to_bytes())
            held = {}
            for blob in blobs:
                try:
                    held[hashlib.sha256(blob).hexdigest()] = SparseUpdate.from_bytes(
                        blob, numel=bases[0][k].size, config=config
                    )
                except SparseRejected:
                    result.dropped += 1  # bytes that do not decode: no member holds them
            result.averaging_bytes += outer_round_bytes(
                [len(b) for b in blobs], gather_s=o.gather_seconds, agree_s=o.agree_seconds
            )["total"]
            digests = set()
            for i in range(members):
                order = list(held)
                np.random.default_rng((seed, r, k, i)).shuffle(order)
                agg = aggregate({d: held[d] for d in order}, {d: weight for d in order}, max_weight=2 * weight)
                bases[i][k] = outers[i][k].step(bases[i][k], agg.update)
                _set_flat(params[i][k], bases[i][k])
                digests.add(hashlib.sha256(bases[i][k].tobytes()).hexdigest())
            result.dropped += len(agg.dropped)
            result.clipped += len(agg.clipped)
            identical = identical and len(digests) == 1
        result.rounds += 1
        result.identical_rounds += int(identical)
        progress(f"round {r + 1}/{rounds}")
    result.tokens = group.tokens
    final = group.models[0]
    result.finite = all(bool(np.isfinite(b).all()) for b in bases[0])
    result.loss = heldout_loss(final, eval_batches) if result.finite else math.nan
    return result
