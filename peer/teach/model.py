"""A teacher's model: a local Hugging Face causal LM, frozen, checked against the run's spec,
that turns token ids into sparse soft targets (``protocol.soft_targets``).

Any architecture ``transformers`` loads will do, as long as it speaks the run's vocabulary:
the same ``tokenizer.json`` (or the same token-to-id table) as the spec's tokenizer, or, for a
run on swarmtrain's byte tokenizer, no tokenizer of its own and a vocabulary that covers the
byte ids. Its identity is ``protocol.weights.weights_digest`` of the directory: what a spec pins
in ``distill.teacher_digests`` and what spot checks compare teachers by.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from peer.data.tokenizer import file_sha256, load_tokenizer
from protocol.spec import BYTE_VOCAB_SIZE, RunSpec
from protocol.weights import WeightsError, weights_digest

log = logging.getLogger("swarmtrain.teach")

__all__ = ["TeacherError", "TeacherModel", "check_vocabulary"]


class TeacherError(ValueError):
    """A model directory that cannot teach this run; the message says why."""


def _config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise TeacherError(f"{hf_dir}: no readable config.json ({err.strerror}): not a Hugging Face model directory")
    except json.JSONDecodeError as err:
        raise TeacherError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise TeacherError(f"{path}: not a JSON object")
    return config


def _vocab_size(config: dict) -> Optional[int]:
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and size > 0 else None


def check_vocabulary(hf_dir: Path, spec: RunSpec, config: dict) -> int:
    """Raises TeacherError unless the model speaks the spec's vocabulary; returns how many of
    its output logits count (the ids the run's tokenizer can produce, at most the spec's
    vocabulary)."""
    model_vocab = _vocab_size(config)
    if model_vocab is None:
        raise TeacherError(f"{hf_dir}/config.json names no vocab_size")
    tok_file = hf_dir / "tokenizer.json"
    if spec.tokenizer.kind == "bytes":
        if tok_file.exists():
            raise TeacherError(
                f"{hf_dir} has its own tokenizer.json, but run {spec.run_id!r} uses swarmtrain's byte tokenizer: "
                "a teacher must speak the run's vocabulary"
            )
        needed = BYTE_VOCAB_SIZE
    else:
        run_tok = load_tokenizer(spec.tokenizer)
        if not tok_file.is_file():
            raise TeacherError(
                f"{hf_dir} has no tokenizer.json; run {spec.run_id!r} uses {run_tok.path.name} "
                f"(sha256 {spec.tokenizer.sha256[:16]}): a teacher must speak the run's vocabulary"
            )
        if file_sha256(tok_file) != spec.tokenizer.sha256:
            from tokenizers import Tokenizer

            ours, theirs = (
                Tokenizer.from_file(str(run_tok.path)).get_vocab(),
                Tokenizer.from_file(str(tok_file)).get_vocab(),
            )
            if ours != theirs:
                differ = sorted(t for t in set(ours) | set(theirs) if ours.get(t) != theirs.get(t))
                raise TeacherError(
                    f"{tok_file} is not the run's tokenizer: {len(differ)} token(s) differ "
                    f"(e.g. {differ[:3]!r}; the run's has {len(ours)} tokens, the teacher's {len(theirs)})"
                )
            log.info("%s differs from the run's tokenizer file but maps every token to the same id", tok_file)
        needed = run_tok.vocab_size
    if model_vocab < needed:
        raise TeacherError(
            f"{hf_dir}: the model has {model_vocab} output tokens, fewer than the run's tokenizer's {needed}"
        )
    return min(model_vocab, spec.model.vocab_size)


class TeacherModel:
    """The frozen model, and what it answers: top-k log-probabilities at the run's temperature."""

    def __init__(
        self, model: torch.nn.Module, *, digest: str, vocab: int, model_vocab: int, k: int, temperature: float
    ):
        self.model, self.digest = model, digest
        self.vocab, self.model_vocab = vocab, model_vocab
        self.k, self.temperature = k, temperature

    @classmethod
    def load(cls, hf_dir, spec: RunSpec) -> "TeacherModel":
        """Loads ``hf_dir`` for ``spec`` (which must have a ``[distill]`` section); raises
        TeacherError naming what does not fit before any weight is read."""
        hf_dir = Path(hf_dir)
        if spec.distill is None:
            raise TeacherError(f"run {spec.run_id!r} does not distill: its spec has no [distill] section")
        config = _config(hf_dir)
        vocab = check_vocabulary(hf_dir, spec, config)
        if vocab < spec.distill.k:
            raise TeacherError(f"distill.k = {spec.distill.k} exceeds the {vocab} tokens of the vocabulary")
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and positions < spec.training.seq_len:
            raise TeacherError(
                f"{hf_dir}: the model reads at most {positions} positions, the run's sequences are "
                f"{spec.training.seq_len} tokens long"
            )
        try:
            digest = weights_digest(hf_dir)
        except WeightsError as err:
            raise TeacherError(str(err)) from None
        if not spec.distill.accepts(digest):
            raise TeacherError(
                f"{hf_dir}: weights {digest} are not among the teachers run {spec.run_id!r} accepts "
                f"(distill.teacher_digests: {', '.join(d[:16] for d in spec.distill.teacher_digests)})"
            )
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32)
        except Exception as err:  # transformers raises many kinds for a directory it cannot load
            raise TeacherError(f"{hf_dir}: transformers cannot load it ({type(err).__name__}: {err})") from None
        model.eval().requires_grad_(False)
        return cls(
            model,
            digest=digest,
            vocab=vocab,
            model_vocab=_vocab_size(config),
            k=spec.distill.k,
            temperature=spec.distill.temperature,
        )

    def soft_targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k ids int64, their log-probabilities float32), each ``[batch, length, k]``, most
        likely first; the probabilities are over the run's vocabulary at its temperature."""
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[..., : self.vocab].float()
            logprobs = torch.log_softmax(logits / self.temperature, dim=-1)
            values, top = logprobs.topk(self.k, dim=-1)
        return top, values

    def measure(self, batch: int, length: int, passes: int = 3) -> float:
        """Samples/s of the best of ``passes`` timed forwards (after one warm-up) on random ids."""
        ids = torch.randint(0, self.vocab, (batch, length), generator=torch.Generator().manual_seed(0))
        self.soft_targets(ids)
        best = math.inf
        for _ in range(passes):
            start = time.perf_counter()
            self.soft_targets(ids)
            best = min(best, time.perf_counter() - start)
        return batch / max(best, 1e-9)
