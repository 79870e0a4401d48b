"""Teachers for the teacher tests, made here and exported the way a user would: stage weights
written as signed checkpoints, joined by ``swarmtrain checkpoint export`` into a Hugging Face
directory (``untrained_teacher``: the initial weights, exported directly). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file as load_tensors

from peer.checkpoints.store import write_checkpoint
from peer.dev.local_train import train_local
from peer.model.hf_io import export_hf_dir
from peer.model.llama import LlamaStage
from protocol.spec import RunSpec, preset_spec

from cli_helpers import invoke as cli


def invoke(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def distill_spec(**distill) -> RunSpec:
    """The tiny preset of a run that distills, with these ``[distill]`` settings."""
    return preset_spec("tiny", run_id="teachtest", distill=dict(distill))


def untrained_teacher(out: Path) -> Path:
    """The initial weights of ``distill_spec()``'s stages exported as a Hugging Face directory."""
    spec = distill_spec()
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    export_hf_dir(spec, [s.state_dict() for s in stages], out)
    return out


def teacher_spec(workdir: Path, run_id: str = "teacher") -> tuple[RunSpec, Path, Path]:
    """The spec the teacher was trained under (byte tokenizer, like the students'), its file and
    the key that signs its checkpoints."""
    key = workdir / "teacher.pem"
    if not key.exists():
        invoke("keygen", key)
    spec_path = workdir / f"{run_id}.toml"
    invoke(
        "spec",
        "init",
        spec_path,
        "--preset",
        "tiny",
        "--run-id",
        run_id,
        "--trusted-key",
        key.with_suffix(".pub"),
        "--force",
    )
    return RunSpec.model_validate_json(spec_json(spec_path)), spec_path, key


def spec_json(path: Path) -> str:
    from protocol.spec import load_spec

    return load_spec(path).canonical_json()


def export(workdir: Path, name: str, spec: RunSpec, spec_path: Path, key: Path, states: list[dict]) -> Path:
    """Signed checkpoints of ``states`` (one per stage), exported with the CLI; returns the directory."""
    ckpts = []
    for k, state in enumerate(states):
        written = write_checkpoint(
            workdir / name / "ckpt" / f"stage-{k}",
            spec=spec,
            stage=k,
            step=1,
            tokens_seen=0,
            model_state=state,
            key_paths=[key],
        )
        ckpts.append(written.path)
    out = workdir / name / "hf"
    invoke("checkpoint", "export", *ckpts, "--out", out, "--spec", spec_path)
    return out


def trained_teacher(workdir: Path, data: Path, *, steps: int = 60) -> Path:
    """A tiny model trained briefly on ``data``."""
    spec, spec_path, key = teacher_spec(workdir)
    final = workdir / "trained" / "final"
    train_local(spec, data, steps=steps, threads=1, final_state=str(final))
    states = [load_tensors(final / f"stage{k}.safetensors") for k in range(spec.num_stages)]
    return export(workdir, "trained", spec, spec_path, key, states)


def one_token_teacher(workdir: Path, token: int) -> Path:
    """A model that puts nearly all its mass on ``token`` whatever it reads: the blocks add
    nothing to the residual stream (zero output projections), every embedding has a large
    constant first coordinate, and only ``token``'s row of the head reads that coordinate."""
    spec, spec_path, key = teacher_spec(workdir, run_id="onetoken")
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    with torch.no_grad():
        for stage in stages:
            for name, p in stage.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.zero_()
            if stage.has_embedding:
                stage.model.embed_tokens.weight[:, 0] = 1.0
            if stage.has_head:
                stage.lm_head.weight[:, 0] = 0.0
                stage.lm_head.weight[token, 0] = 2.0
    return export(workdir, "onetoken", spec, spec_path, key, [s.state_dict() for s in stages])
