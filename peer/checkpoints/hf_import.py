"""A Hugging Face model as a run's signed step 0 (``swarmtrain checkpoint import``).

Each stage's tensors are read from the model's safetensors alone (``load_stage_from_hf``: the
rest of the model is never loaded) and written as one signed checkpoint of that stage at step
0, in the layout a keeper's ``--checkpoint-dir`` uses, so that the keeper serves them and
joining peers fetch and verify their own stage's slice over P2P."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from peer.checkpoints.store import CheckpointStore, WrittenCheckpoint
from peer.model.hf_io import CheckpointError, load_stage_from_hf
from protocol.checkpoint import verify_checkpoint
from protocol.spec import RunSpec
from protocol.weights import weights_digest

__all__ = ["import_hf"]


def import_hf(
    hf_dir: str | Path,
    spec: RunSpec,
    key_path: str | Path,
    out: str | Path,
    *,
    progress: Callable[[str], None] = lambda _: None,
) -> list[WrittenCheckpoint]:
    hf_dir = Path(hf_dir)
    if spec.init.weights_sha256 is None:
        raise CheckpointError(
            "the run spec does not name the weights its step 0 is (init.weights_sha256): write it with "
            "`swarmtrain spec init OUT --from-hf HF_DIR`"
        )
    progress(f"hashing the weights of {hf_dir}")
    digest = weights_digest(hf_dir)
    if digest != spec.init.weights_sha256:
        raise CheckpointError(
            f"{hf_dir}: its weights have digest {digest}, the run spec names {spec.init.weights_sha256} "
            "(init.weights_sha256): not the model this run starts from"
        )
    store = CheckpointStore(Path(out), spec, key_paths=[Path(key_path)], keep=1_000_000)
    written = []
    for stage in range(spec.num_stages):
        if any(c.meta.step == 0 for c in store.list(stage)):
            raise CheckpointError(f"{store.dir_for(stage, 0)} exists: import into an empty directory")
        module = load_stage_from_hf(hf_dir, spec, stage)
        state = {name: p.detach() for name, p in module.named_parameters()}
        w = store.save(stage, 0, state, tokens_seen=0, parent_digest=None, prune=False)
        verify_checkpoint(w.path, spec, expected_stage=stage, load_tensors=False)  # our own signature checks out
        progress(f"stage {stage}: {len(state)} tensors -> {w.path} (manifest {w.manifest_digest[:16]})")
        written.append(w)
    return written
