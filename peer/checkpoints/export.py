"""Joining verified stage checkpoints of one step into a Hugging Face model directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence

from peer.model.hf_io import export_hf_dir
from protocol.checkpoint import VerifiedCheckpoint
from protocol.spec import RunSpec


class ExportError(ValueError):
    """The checkpoints do not make one model: a stage missing or given twice, or mixed steps."""


def export_checkpoints(
    spec: RunSpec, verified: Sequence[VerifiedCheckpoint], out_dir: Path, *, max_shard_bytes: Optional[int] = None
) -> int:
    """Write the model of ``verified`` (one checkpoint of every stage, all of one step) to
    ``out_dir``; returns the step. The checkpoints must have been verified by the caller."""
    by_stage: dict[int, VerifiedCheckpoint] = {}
    for v in verified:
        if v.meta.stage in by_stage:
            raise ExportError(f"stage {v.meta.stage} given twice: {by_stage[v.meta.stage].path} and {v.path}")
        by_stage[v.meta.stage] = v
    missing = [k for k in range(spec.num_stages) if k not in by_stage]
    if missing:
        raise ExportError(
            f"stage(s) {', '.join(map(str, missing))} missing: the spec has {spec.num_stages} stages "
            "and export needs one checkpoint of each"
        )
    steps = {v.meta.step for v in verified}
    if len(steps) > 1:
        detail = ", ".join(f"stage {k}: step {by_stage[k].meta.step}" for k in sorted(by_stage))
        raise ExportError(f"checkpoints are of different steps ({detail}); export joins the stages of one step")
    try:
        export_hf_dir(
            spec, [by_stage[k].model_state for k in range(spec.num_stages)], out_dir, max_shard_bytes=max_shard_bytes
        )
    except FileExistsError as err:
        raise ExportError(str(err)) from None
    _copy_tokenizer(spec, out_dir)
    return steps.pop()


def _copy_tokenizer(spec: RunSpec, out_dir: Path) -> None:
    """A run with a tokenizer.json exports it beside the weights (checked against the spec's
    SHA-256), so that the directory is a model one can generate text with; a byte-level run has
    no file to copy."""
    if spec.tokenizer.kind != "file":
        return
    from peer.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.tokenizer)
    except TokenizerError as err:
        raise ExportError(f"the weights are exported to {out_dir}, but not the tokenizer: {err}") from None
    shutil.copyfile(tokenizer.path, Path(out_dir) / "tokenizer.json")
