"""Hugging Face checkpoints in and out, one stage at a time.

Import reads only the tensors a stage holds, opening only the shard files that contain them, so
a peer serving 4 layers of a large model never maps the rest. Export joins the state dicts of
all stages into a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
Only safetensors is read or written: pickle checkpoints can run code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peer.model.llama import EMBED, HEAD, LlamaStage, stage_param_shapes
from peer.model.tensor_files import save_tensors
from protocol.spec import BYTE_VOCAB_SIZE, RunSpec, spec_from_dict
from protocol.weights import weights_digest

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it

# Fields of config.json that decide the shapes or the function of the weights.
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "head_dim",
    "rope_scaling",
)
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run; the message names the file, tensor and values."""


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf_dir: str | Path) -> dict:
    """The ``ModelSpec`` fields of a Llama ``config.json`` (transformers 4.x or 5.x layout)."""
    path = Path(hf_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a Hugging Face model directory needs config.json") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None

    def unsupported(what: str):
        return CheckpointError(f"{path}: {what}; swarmtrain runs plain Llama models only")

    if cfg.get("model_type") != "llama":
        raise unsupported(f"model_type is {cfg.get('model_type')!r}, not 'llama'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act is {cfg['hidden_act']!r}")
    for bias in ("attention_bias", "mlp_bias"):
        if cfg.get(bias):
            raise unsupported(f"{bias} is true")
    # transformers 5 nests RoPE settings in rope_parameters; 4.x has rope_theta and rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type in ROPE_SCALING_KEYS:
        missing = [k for k in ROPE_SCALING_KEYS[rope_type][:1] if k not in rope]
        if missing:
            raise CheckpointError(f"{path}: RoPE scaling {rope_type!r} without {', '.join(missing)}")
        scaling = {"rope_type": rope_type, **{k: rope[k] for k in ROPE_SCALING_KEYS[rope_type] if k in rope}}
    elif rope_type != "default":
        raise unsupported(f"rope_scaling.rope_type is {rope_type!r} (implemented: default, linear, llama3)")
    missing = [f for f in ARCH_FIELDS[:5] if f not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim == cfg["hidden_size"] // heads:
        head_dim = None  # the default width, spelled out
    # Defaults are LlamaConfig's, for configs that leave fields out.
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=cfg.get("initializer_range", 0.02),
        head_dim=head_dim,
        rope_scaling=scaling,
    )


def even_cuts(layers: int, stages: int) -> list[int]:
    """The first layer of stages 1..n-1 when ``layers`` are split as evenly as they go."""
    if not 1 <= stages <= layers:
        raise ValueError(f"{stages} stages for {layers} layers: need 1 <= stages <= layers")
    return [round(k * layers / stages) for k in range(1, stages)]


def spec_from_hf(
    hf_dir: str | Path,
    *,
    run_id: str,
    stages: Optional[int] = None,
    cuts: Optional[Sequence[int]] = None,
    seed: int = 0,
    trusted_keys: Sequence[str] = (),
    tokenizer: Optional[dict] = None,
) -> RunSpec:
    """A run spec whose architecture is the model's ``config.json``, whose layers are split
    evenly into ``stages`` (default 2) or at ``cuts`` (the first layer of each later stage), and
    whose step 0 is the model's weights (``init.weights_sha256``). ``tokenizer``: the spec's
    tokenizer section (default: the byte tokenizer)."""
    hf_dir = Path(hf_dir)
    model = config_from_hf(hf_dir)
    layers = model["num_hidden_layers"]
    if cuts is None:
        cuts = even_cuts(layers, min(stages or 2, layers))
    bounds = [0, *cuts, layers]
    if any(b >= a for a, b in zip(bounds[1:], bounds)) or bounds[-2] >= layers:
        raise ValueError(f"layer cuts {list(cuts)} must rise strictly within 1..{layers - 1}")
    training = {}
    if model["max_position_embeddings"] < 64:  # the default sequence must fit the model
        training["seq_len"] = model["max_position_embeddings"]
    data = {
        "run_id": run_id,
        "seed": seed,
        "model": {k: v for k, v in model.items() if v is not None},
        "stages": [{"start": a, "end": b} for a, b in zip(bounds, bounds[1:])],
        "training": training,
        "trust": {"trusted_keys": list(trusted_keys)},
        "init": {"weights_sha256": weights_digest(hf_dir)},
    }
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    return spec_from_dict(data)


def _check_config(hf: dict, spec: RunSpec, hf_dir: Path) -> None:
    problems = []
    for field in ARCH_FIELDS:
        theirs, ours = hf.get(field), getattr(spec.model, field)
        if hasattr(ours, "model_dump"):  # rope_scaling: compared as the spec writes it
            ours = ours.model_dump()
            theirs = None if theirs is None else type(spec.model.rope_scaling)(**theirs).model_dump()
        if field == "tie_word_embeddings" and ours and not theirs and spec.num_stages > 1:
            # Multi-stage runs train the two ends as untied copies anyway, and our own export of
            # such a run says false once they have drifted apart: loading it back must work.
            continue
        same = math.isclose(theirs, ours, rel_tol=1e-9) if isinstance(ours, float) else theirs == ours
        if not same:
            problems.append(f"{field} is {theirs!r} in config.json but {ours!r} in the run spec (model.{field})")
    if problems:
        raise CheckpointError(f"{hf_dir / 'config.json'} does not match the run spec: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# import


def _tensor_locations(hf_dir: Path) -> dict[str, Path]:
    index, single = hf_dir / INDEX_FILE, hf_dir / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
        return {name: hf_dir / file for name, file in weight_map.items()}
    if single.exists():
        with safe_open(single, framework="pt") as f:  # reads the header only
            return {name: single for name in f.keys()}
    raise CheckpointError(
        f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints are read "
        "(re-save with save_pretrained(..., safe_serialization=True))"
    )


def _checked(tensor: torch.Tensor, shape: tuple, name: str, path: Path) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected a floating-point type")
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf")
    return tensor


def load_stage_from_hf(hf_dir: str | Path, spec: RunSpec, stage: int) -> LlamaStage:
    """Stage ``stage`` of ``spec`` with its weights from a Hugging Face model directory."""
    hf_dir = Path(hf_dir)
    hf = config_from_hf(hf_dir)
    _check_config(hf, spec, hf_dir)
    locations = _tensor_locations(hf_dir)
    module = LlamaStage.from_spec(spec, stage, init=False)
    params = dict(module.named_parameters())

    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for name in params:
        # A tied checkpoint's head *is* its embedding, whatever else the file holds (HF semantics).
        source = EMBED if name == HEAD and hf["tie_word_embeddings"] else name
        if source not in locations:
            where = INDEX_FILE if (hf_dir / INDEX_FILE).exists() else SINGLE_FILE
            raise CheckpointError(f"{hf_dir / where}: tensor {source!r} (needed by stage {stage}) is missing")
        by_file[locations[source]].append((name, source))

    with torch.no_grad():
        for path, names in by_file.items():
            if not path.exists():
                raise CheckpointError(f"{path}: missing, but the index lists tensor {names[0][1]!r} in it")
            with safe_open(path, framework="pt") as f:
                present = set(f.keys())
                for name, source in names:
                    if source not in present:
                        raise CheckpointError(f"{path}: tensor {source!r} is missing (the index says it is here)")
                    params[name].copy_(_checked(f.get_tensor(source), params[name].shape, source, path))
    return module


# ---------------------------------------------------------------------------------------------
# export


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def export_hf_dir(
    spec: RunSpec,
    stage_state_dicts: list[dict[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    max_shard_bytes: int | None = None,
) -> Path:
    """Join the state dicts of all stages into a Hugging Face model directory, atomically."""
    if len(stage_state_dicts) != spec.num_stages:
        raise CheckpointError(
            f"export needs one state dict per stage: got {len(stage_state_dicts)}, the spec has {spec.num_stages}"
        )
    merged: dict[str, torch.Tensor] = {}
    for k, sd in enumerate(stage_state_dicts):
        shapes = stage_param_shapes(spec, k)
        sd = dict(sd)
        if EMBED in shapes and HEAD in sd and HEAD not in shapes:
            # state_dict() of a tied single-stage model repeats the shared tensor under both names.
            if not torch.equal(sd[HEAD], sd[EMBED]):
                raise CheckpointError(f"stage {k}: tied model but {HEAD} differs from {EMBED}")
            del sd[HEAD]
        missing, unexpected = shapes.keys() - sd.keys(), sd.keys() - shapes.keys()
        if missing or unexpected:
            raise CheckpointError(f"stage {k} state dict: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, shape in shapes.items():
            merged[name] = _checked(sd[name].detach().cpu().contiguous(), shape, name, Path(f"<stage {k}>"))

    # A multi-stage tied run ends with two copies; they stay tied in the export only while equal.
    tied = spec.model.tie_word_embeddings and (HEAD not in merged or torch.equal(merged[HEAD], merged[EMBED]))
    if tied:
        merged.pop(HEAD, None)
    config = spec.model.hf_config_dict()
    config["tie_word_embeddings"] = tied
    config["torch_dtype"] = str(merged[EMBED].dtype).removeprefix("torch.")

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shards = _shards(merged, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata=_METADATA)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata=_METADATA)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in merged.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if spec.tokenizer.kind == "bytes":
            # The byte tokenizer's end-of-document id is its last one; generate() stops there.
            eos = BYTE_VOCAB_SIZE - 1
            gen = {"eos_token_id": eos, "pad_token_id": eos}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, out_dir)  # replaces an empty directory, refuses a full one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)
    return out_dir


# ---------------------------------------------------------------------------------------------
# per-stage files (the checkpoint store's format)


def save_stage_safetensors(stage_module: LlamaStage, path: str | Path) -> Path:
    """Write a stage's parameters (HF names; a shared tied tensor once) atomically."""
    path = Path(path)
    tensors = {
        name: _checked(p.detach().cpu().contiguous(), p.shape, name, path)
        for name, p in stage_module.named_parameters()
    }
    save_tensors(tensors, path)
    _fsync(path.parent)
    return path


def load_stage_safetensors(path: str | Path, stage_module: LlamaStage) -> LlamaStage:
    """Load a file written by ``save_stage_safetensors``; every tensor is checked before any is
    copied, so a bad file leaves the module untouched."""
    path = Path(path)
    params = dict(stage_module.named_parameters())
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing, unexpected = params.keys() - keys, keys - params.keys()
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)}")
        tensors = {name: _checked(f.get_tensor(name), p.shape, name, path) for name, p in params.items()}
    stage_module.load_parameters(tensors, source=str(path))
    return stage_module
