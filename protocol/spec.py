"""The run spec: the one file every peer of a run agrees on.

A spec is TOML on disk and a pydantic model in memory. Its digest (SHA-256 of the canonical
JSON) goes into every DHT key and every RPC, so peers of different specs never mix.
Architecture fields use Hugging Face ``LlamaConfig`` names so that a spec maps 1:1 onto a
``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar, Literal, Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPEC_FORMAT_VERSION = 1


class SpecError(ValueError):
    """A spec that cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The fields of spec format 1. The digest always covers these; a field added later is left
    # out of the canonical JSON while it holds its default, so that a spec which does not set
    # it keeps the digest it had (peers of the previous version still find it).
    _DIGEST_V1: ClassVar[frozenset[str]] = frozenset()

    def canonical_dict(self) -> dict:
        """``model_dump(mode="json")`` less the post-format-1 fields at their defaults."""
        return _canonical(self, self.model_dump(mode="json"))


class RopeScaling(_Strict):
    """RoPE frequency scaling, in Hugging Face's ``rope_scaling`` names: ``linear`` divides every
    frequency by ``factor``; ``llama3`` (Llama 3.1 and later) divides the low frequencies by it,
    keeps the high ones, and ramps smoothly between."""

    rope_type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(default=1.0, gt=0)
    high_freq_factor: float = Field(default=4.0, gt=0)
    original_max_position_embeddings: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _ramp(self) -> "RopeScaling":
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                f"({self.low_freq_factor})"
            )
        return self


class ModelSpec(_Strict):
    """Llama-family architecture, in Hugging Face ``LlamaConfig`` field names."""

    _DIGEST_V1 = frozenset(
        {
            "hidden_size",
            "initializer_range",
            "intermediate_size",
            "max_position_embeddings",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
            "vocab_size",
        }
    )

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    max_position_embeddings: int = Field(default=2048, gt=0)
    tie_word_embeddings: bool = False
    initializer_range: float = Field(default=0.02, gt=0)
    # Per-head width when it is not hidden_size / num_attention_heads (some Llama checkpoints).
    head_dim: Optional[int] = Field(default=None, gt=0)
    rope_scaling: Optional[RopeScaling] = None

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                f"model.hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.attn_head_dim % 2:
            raise ValueError(f"the attention head width ({self.attn_head_dim}) must be even for RoPE")
        return self

    @property
    def attn_head_dim(self) -> int:
        """The width of one attention head: ``head_dim``, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def hf_config_dict(self) -> dict:
        """The ``config.json`` of a Hugging Face ``LlamaForCausalLM`` with this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": None,
            "eos_token_id": None,
            **_drop_none(self.model_dump(mode="json")),
            "head_dim": self.attn_head_dim,
        }


class StageSpec(_Strict):
    """A half-open range of transformer blocks ``[start, end)``."""

    _DIGEST_V1 = frozenset({"end", "start"})

    start: int = Field(ge=0)
    end: int = Field(gt=0)

    @model_validator(mode="after")
    def _nonempty(self) -> "StageSpec":
        if self.end <= self.start:
            raise ValueError(f"stage range [{self.start}, {self.end}) is empty")
        return self


class OuterSpec(_Strict):
    """Outer rounds (``training.averaging = "outer"``): each stage peer trains on its own with
    the spec's optimizer, and every ``round_seconds`` (on the wall clock every peer shares) the
    stage group exchanges compressed pseudo-gradients, agrees on the set and applies their
    robust aggregate with Nesterov momentum (``peer.averaging``: sparse, contribution, robust,
    rounds, outer_step)."""

    round_seconds: float = Field(default=120.0, gt=0)
    gather_seconds: float = Field(default=15.0, gt=0)
    agree_seconds: float = Field(default=10.0, gt=0)
    # 128 of every 4096 values (3.1%) at 2 bits, plain averaging of the pseudo-gradients (outer
    # lr 1, no momentum): the best held-out loss of scripts/bench_outer.py at 20 rounds of 16
    # inner steps (k = 32 was 10% worse there; momentum 0.5 or 0.9, DiLoCo's setting for 500
    # inner steps, 3-5% worse).
    chunk: int = Field(default=4096, gt=1)
    k: int = Field(default=128, gt=0)
    bits: Literal[2, 3, 4, 8] = 2
    outer_lr: float = Field(default=1.0, gt=0)
    outer_momentum: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _fits(self) -> "OuterSpec":
        if self.gather_seconds + self.agree_seconds >= self.round_seconds:
            raise ValueError("training.outer: gather_seconds + agree_seconds must be shorter than round_seconds")
        if self.chunk & (self.chunk - 1) or self.k > self.chunk:
            raise ValueError("training.outer: chunk must be a power of two and k at most chunk")
        return self


class TrainingSpec(_Strict):
    _DIGEST_V1 = frozenset(
        {
            "average_state_every",
            "averaging_timeout",
            "betas",
            "delay_optimizer_step",
            "eps",
            "grad_clip",
            "lr",
            "lr_schedule",
            "matchmaking_time",
            "micro_batch_size",
            "optimizer",
            "seq_len",
            "target_batch_size",
            "total_steps",
            "warmup_steps",
            "weight_decay",
        }
    )
    optimizer: Literal["adamw", "adamw8bit", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    total_steps: int = Field(default=10_000, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    micro_batch_size: int = Field(default=8, gt=0)
    seq_len: int = Field(default=64, gt=1)
    target_batch_size: int = Field(
        default=64, gt=0, description="samples a stage group accumulates before one averaged update"
    )
    # hivemind averaging timings; production values are longer than the test ones.
    matchmaking_time: float = Field(default=3.0, gt=0)
    averaging_timeout: float = Field(default=30.0, gt=0)
    delay_optimizer_step: bool = True
    # Parameters are also averaged every this many epochs, to undo drift from lossy codecs.
    average_state_every: int = Field(default=5, ge=1)
    # per_step: hivemind's all-reduce of gradients at every step; outer: rounds (OuterSpec).
    averaging: Literal["per_step", "outer"] = "per_step"
    outer: OuterSpec = OuterSpec()


ActivationCodec = Literal["none", "fp16", "uniform8bit", "blockwise8bit"]
GradientCodec = Literal["none", "fp16", "uniform8bit", "blockwise8bit", "powersgd"]


class CompressionSpec(_Strict):
    _DIGEST_V1 = frozenset({"activations", "gradients", "min_compressed_size", "powersgd_rank"})
    activations: ActivationCodec = "fp16"
    gradients: GradientCodec = "blockwise8bit"
    powersgd_rank: int = Field(default=8, gt=0)
    # Tensors smaller than this many elements are averaged in fp16 even with an 8-bit codec:
    # 8-bit overheads dominate for norms and biases (SWARM does the same).
    min_compressed_size: int = Field(default=4096, ge=0)


class TrustSpec(_Strict):
    _DIGEST_V1 = frozenset({"accept_untrusted_live_state", "max_live_state_lag", "min_signatures", "trusted_keys"})
    trusted_keys: tuple[str, ...] = Field(default=(), description="PEM public keys (ECDSA P-256)")
    min_signatures: int = Field(default=1, ge=1)
    accept_untrusted_live_state: bool = True
    max_live_state_lag: int = Field(
        default=100, ge=0, description="epochs live state may be ahead of the trusted checkpoint"
    )

    @field_validator("trusted_keys")
    @classmethod
    def _pem(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for i, key in enumerate(keys):
            if "BEGIN PUBLIC KEY" not in key:
                raise ValueError(f"trust.trusted_keys[{i}] is not a PEM public key")
        return tuple(k.strip() + "\n" for k in keys)


class TokenizerSpec(_Strict):
    _DIGEST_V1 = frozenset({"kind", "path", "sha256"})
    kind: Literal["bytes", "file"] = "bytes"
    path: Optional[str] = None
    sha256: Optional[str] = None

    @model_validator(mode="after")
    def _file_needs_path(self) -> "TokenizerSpec":
        if self.kind == "file" and not (self.path and self.sha256):
            raise ValueError("tokenizer.kind = 'file' needs tokenizer.path and tokenizer.sha256")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError("tokenizer.sha256 must be 64 lowercase hex digits")
        return self


class InitSpec(_Strict):
    """Where the run's weights start. Default: the spec's seeded random initialisation. With
    ``weights_sha256`` (``protocol.weights.weights_digest`` of a Hugging Face model directory),
    step 0 is those weights, imported as signed checkpoints (``swarmtrain checkpoint import``):
    a peer without a verified checkpoint of its stage refuses to start from random weights."""

    weights_sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class DistillSpec(_Strict):
    """Teacher peers (``swarmtrain teach``): trainers fetch a teacher's sparse soft targets for
    each micro-batch and the last stage adds the distillation term to its loss:
    ``(1 - weight) * label cross-entropy + weight * temperature**2 * KL(teacher || student)``,
    the KL over each position's top-``k`` teacher tokens and one bucket for the rest of the
    vocabulary (``protocol.soft_targets``). Without the section, or with no teacher online, the
    loss is the label cross-entropy alone."""

    # The section is new, so a spec without it keeps its digest; within it, every field is
    # written (a reader of the TOML sees the weight, temperature and k the run uses).
    _DIGEST_V1 = frozenset({"teacher_digests", "weight", "temperature", "k", "spot_check"})

    # SHA-256 of the teacher's weight files (``protocol.weights.weights_digest``); empty: any
    # teacher whose vocabulary matches the run's tokenizer.
    teacher_digests: tuple[str, ...] = ()
    weight: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    k: int = Field(default=8, ge=1, le=64)
    # The fraction of micro-batches also sent to a second teacher of the same weights, to compare.
    spot_check: float = Field(default=0.05, ge=0, le=1)

    @field_validator("teacher_digests")
    @classmethod
    def _hex(cls, digests: tuple[str, ...]) -> tuple[str, ...]:
        for i, d in enumerate(digests):
            if not re.fullmatch(r"[0-9a-f]{64}", d):
                raise ValueError(f"distill.teacher_digests[{i}] must be 64 lowercase hex digits (a SHA-256)")
        return tuple(sorted(set(digests)))

    def accepts(self, model_digest: str) -> bool:
        return not self.teacher_digests or model_digest in self.teacher_digests


class RunSpec(_Strict):
    _DIGEST_V1 = frozenset(
        {"compression", "format_version", "model", "run_id", "seed", "stages", "tokenizer", "training", "trust"}
    )
    format_version: int = SPEC_FORMAT_VERSION
    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
    seed: int = Field(default=0, ge=0)
    model: ModelSpec
    stages: tuple[StageSpec, ...]
    training: TrainingSpec = TrainingSpec()
    compression: CompressionSpec = CompressionSpec()
    trust: TrustSpec = TrustSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    init: InitSpec = InitSpec()
    distill: Optional[DistillSpec] = None

    @model_validator(mode="after")
    def _partition(self) -> "RunSpec":
        if not self.stages:
            raise ValueError("stages: at least one stage is required")
        expected = 0
        for k, stage in enumerate(self.stages):
            if stage.start < expected:
                raise ValueError(
                    f"stages[{k}] starts at layer {stage.start}, overlapping the previous stage "
                    f"(which ends at {expected})"
                )
            if stage.start > expected:
                raise ValueError(
                    f"stages[{k}] starts at layer {stage.start}: layers {expected}..{stage.start - 1} are in no stage"
                )
            expected = stage.end
        if expected != self.model.num_hidden_layers:
            raise ValueError(
                f"stages: the last stage ends at layer {expected} but model.num_hidden_layers is "
                f"{self.model.num_hidden_layers}"
            )
        if self.training.seq_len > self.model.max_position_embeddings:
            raise ValueError("training.seq_len exceeds model.max_position_embeddings")
        if self.tokenizer.kind == "bytes" and self.model.vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(f"model.vocab_size must be >= {BYTE_VOCAB_SIZE} for the byte tokenizer")
        return self

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def canonical_json(self) -> str:
        return json.dumps(self.canonical_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON: equal specs, equal digests; any change, a new one."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def short_digest(self) -> str:
        return self.digest()[:16]

    def to_toml(self) -> str:
        """The spec as TOML, without the fields added after format 1 while they are at their
        defaults: a spec that uses nothing new loads in older swarmtrain too (same digest)."""
        import tomli_w

        return tomli_w.dumps(_drop_none(self.canonical_dict()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


BYTE_VOCAB_SIZE = 257  # 256 byte values plus one end-of-document token


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{loc}: {msg}")
    return "invalid run spec: " + "; ".join(lines)


def spec_from_dict(data: dict) -> RunSpec:
    try:
        return RunSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err)) from None


def spec_from_toml(text: str) -> RunSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"invalid run spec: not valid TOML ({err})") from None
    return spec_from_dict(data)


def spec_from_json(text: str) -> RunSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"invalid run spec: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise SpecError("invalid run spec: expected a JSON object")
    return spec_from_dict(data)


def load_spec(path: str | Path) -> RunSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read run spec {path}: {err.strerror}") from None
    return spec_from_toml(text)


def even_partition(num_layers: int, num_stages: int) -> tuple[StageSpec, ...]:
    """Split layers into contiguous stages whose sizes differ by at most one."""
    if not 1 <= num_stages <= num_layers:
        raise SpecError(f"--stages must be between 1 and the number of layers ({num_layers}), got {num_stages}")
    base, extra = divmod(num_layers, num_stages)
    stages, start = [], 0
    for k in range(num_stages):
        end = start + base + (1 if k < extra else 0)
        stages.append(StageSpec(start=start, end=end))
        start = end
    return tuple(stages)


PRESETS: dict[str, dict] = {
    # ~0.8M parameters: unit and multi-peer tests.
    "tiny": dict(
        model=dict(
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        training=dict(
            micro_batch_size=8, seq_len=64, target_batch_size=32, lr=3e-3, matchmaking_time=2.0, averaging_timeout=15.0
        ),
        stages=2,
    ),
    # ~25M parameters: a laptop-sized run.
    "small": dict(
        model=dict(
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        training=dict(micro_batch_size=8, seq_len=256, target_batch_size=256, lr=1e-3),
        stages=2,
    ),
    # ~1B parameters (TinyLlama-like shape): a real volunteer run.
    "base": dict(
        model=dict(
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        training=dict(
            micro_batch_size=4,
            seq_len=1024,
            target_batch_size=4096,
            lr=3e-4,
            lr_schedule="cosine",
            warmup_steps=200,
            matchmaking_time=15.0,
            averaging_timeout=120.0,
        ),
        stages=4,
    ),
}


def preset_spec(
    preset: str = "tiny",
    *,
    stages: int | None = None,
    run_id: str = "swarm",
    trusted_keys: tuple[str, ...] = (),
    seed: int = 0,
    **overrides,
) -> RunSpec:
    """A valid spec from a named preset; ``overrides`` are top-level sections merged in."""
    if preset not in PRESETS:
        raise SpecError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    model = ModelSpec(**p["model"])
    num_stages = stages if stages is not None else p["stages"]
    data = dict(
        run_id=run_id,
        seed=seed,
        model=model.model_dump(),
        stages=[s.model_dump() for s in even_partition(model.num_hidden_layers, num_stages)],
        training=dict(p["training"]),
        trust=dict(trusted_keys=list(trusted_keys)),
    )
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return spec_from_dict(data)


def _canonical(model: BaseModel, dumped: dict) -> dict:
    out = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if (
            name not in type(model)._DIGEST_V1
            and not info.is_required()
            and value == info.get_default(call_default_factory=True)
        ):
            continue
        item = dumped[name]
        if isinstance(value, BaseModel):
            item = _canonical(value, item)
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, BaseModel) for v in value):
            item = [_canonical(v, d) for v, d in zip(value, item)]
        out[name] = item
    return out
