"""Training with and without a teacher, in one process, with the code the peers run.

``peer.dev.bench.teach`` compares the held-out loss of a student trained on the same tokens with and
without a teacher's soft targets. Swarms would spend most of two cores on the network stack; here
the student's stages are chained in one process (as ``peer.dev.local_train`` does, with the
same optimizer, schedule and per-stage clipping), and everything that decides the weights is what
the peers run: the teacher is a ``peer.teach.model.TeacherModel`` loaded from a Hugging Face
directory, its answer goes through ``protocol.soft_targets.encode``/``decode`` (the bytes a
trainer receives), and the loss is the last stage's ``peer.model.distill.combined_loss``.

The corpus is split by file: one file in ``HELDOUT_EVERY`` (by a hash of its path) is held out,
and neither the teacher nor the student trains on it; the held-out loss is the label
cross-entropy on fixed batches of those files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from peer.averaging.optimizer import lr_lambda, make_torch_optimizer
from peer.data import PackedDataset
from peer.data.files import discover_files
from peer.data.tokenizer import load_tokenizer
from peer.dev.local_train import train_local
from peer.model.distill import combined_loss
from peer.model.hf_io import export_hf_dir
from peer.model.llama import build_stages, causal_lm_loss, chain_forward
from peer.teach.model import TeacherModel
from protocol import soft_targets
from protocol.spec import RunSpec

HELDOUT_EVERY = 20


def split_corpus(data: str, suffixes: Optional[Sequence[str]], workdir: Path) -> tuple[Path, Path]:
    """Two directories of symlinks: the training files and the held-out ones (every
    ``HELDOUT_EVERY``-th by the SHA-256 of its path)."""
    train, heldout = workdir / "train", workdir / "heldout"
    for d in (train, heldout):
        d.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(discover_files(data, suffixes)):
        h = int(hashlib.sha256(str(path).encode()).hexdigest()[:8], 16)
        target = (heldout if h % HELDOUT_EVERY == 0 else train) / f"{i:06d}{path.suffix}"
        if not target.exists():
            target.symlink_to(path.resolve())
    return train, heldout


@torch.no_grad()
def heldout_loss(stages, batches) -> float:
    return sum(float(causal_lm_loss(chain_forward(stages, b), b)) for b in batches) / len(batches)


def train_teacher(spec: RunSpec, train: Path, out: Path, *, tokens: int, threads: int) -> dict:
    """Train ``spec`` on ``tokens`` tokens of ``train`` and export it as a Hugging Face directory."""
    final = out.parent / "teacher-final"
    t = spec.training
    steps = max(1, tokens // (t.micro_batch_size * t.seq_len))
    result = train_local(spec, train, steps=steps, threads=threads, final_state=str(final))
    from safetensors.torch import load_file

    states = [load_file(str(final / f"stage{k}.safetensors")) for k in range(spec.num_stages)]
    export_hf_dir(spec, states, out)
    return {"tokens": result["tokens"], "seconds": result["seconds"], "tokens_per_s": result["tokens_per_s"]}


@dataclasses.dataclass
class StudentRun:
    seed: int
    teacher: bool
    curve: list  # (tokens, held-out loss), every ``eval_every`` tokens and at the end
    tokens: int = 0
    seconds: float = 0.0
    soft_target_bytes: int = 0
    soft_target_tokens: int = 0

    @property
    def final(self) -> float:
        return self.curve[-1][1]


def student_run(
    spec: RunSpec,
    train: Path,
    batches: Sequence[torch.Tensor],
    *,
    tokens: int,
    seed: int,
    eval_every: int,
    teacher: Optional[TeacherModel] = None,
    threads: int = 2,
) -> StudentRun:
    """Train ``spec``'s model from seed ``seed`` on ``tokens`` tokens of ``train`` (the same
    micro-batches with or without a teacher), measuring the held-out loss as it goes."""
    torch.set_num_threads(threads)
    training = spec.training
    torch.manual_seed(seed)
    stages = build_stages(spec.model_copy(update={"seed": seed}))
    optimizers = [make_torch_optimizer([p for p in s.parameters() if p.requires_grad], training) for s in stages]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(training)) for o in optimizers]
    accumulate = max(1, math.ceil(training.target_batch_size / training.micro_batch_size))
    data = PackedDataset(
        train,
        load_tokenizer(spec.tokenizer),
        seq_len=training.seq_len,
        batch_size=training.micro_batch_size,
        seed=seed,
        peer_key=f"student-{seed}",
    )
    distill = spec.distill
    run = StudentRun(seed, teacher is not None, [(0, heldout_loss(stages, batches))])
    started, step, next_eval = time.monotonic(), 0, eval_every
    while run.tokens < tokens:
        ids = next(data)
        soft = None
        if teacher is not None:
            top, values = teacher.soft_targets(ids)
            wire = soft_targets.encode(top, values, spec.model.vocab_size)
            batch, length = ids.shape
            soft = soft_targets.decode(wire, batch=batch, length=length, k=distill.k, vocab_size=spec.model.vocab_size)
            run.soft_target_bytes += len(wire)
            run.soft_target_tokens += ids.numel()
        logits = chain_forward(stages, ids)
        weight, temperature = (distill.weight, distill.temperature) if distill is not None else (0.0, 1.0)
        loss, _ = combined_loss(logits, ids, soft, weight=weight, temperature=temperature)
        (loss / accumulate).backward()
        run.tokens += ids.numel()
        step += 1
        if step % accumulate == 0:
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        if run.tokens >= next_eval or run.tokens >= tokens:
            run.curve.append((run.tokens, heldout_loss(stages, batches)))
            next_eval += eval_every
    run.seconds = time.monotonic() - started
    return run


def tokens_to_reach(curve: Sequence[tuple[int, float]], target: float) -> Optional[float]:
    """The first token count at which the held-out loss reaches ``target``, interpolated
    linearly between evaluations; None when it never does."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target or l0 == l1:
                return float(t0) if l0 <= target else float(t1)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


@torch.no_grad()
def teacher_heldout_loss(teacher: TeacherModel, batches: Sequence[torch.Tensor]) -> float:
    """The teacher's own label cross-entropy on the held-out batches (over the run's vocabulary)."""
    losses = [float(causal_lm_loss(teacher.model(input_ids=b).logits[..., : teacher.vocab], b)) for b in batches]
    return sum(losses) / len(losses)
