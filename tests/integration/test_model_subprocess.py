"""A stage's initial weights are the same in another Python process."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from peer.model.llama import LlamaStage
from protocol.spec import preset_spec

REPO = Path(__file__).resolve().parents[2]


def test_init_is_identical_in_another_process(tmp_path):
    out = tmp_path / "stage1.safetensors"
    code = (
        "from safetensors.torch import save_file; from protocol.spec import preset_spec;"
        "from peer.model.llama import LlamaStage;"
        "s = LlamaStage.from_spec(preset_spec('tiny', stages=2, seed=7), 1);"
        f"save_file({{n: p.detach().contiguous() for n, p in s.named_parameters()}}, {str(out)!r})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    theirs = load_file(out)
    ours = LlamaStage.from_spec(preset_spec("tiny", stages=2, seed=7), 1).state_dict()
    assert theirs.keys() == ours.keys()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name
