"""A Hugging Face Llama as a run's signed step 0: `spec init --from-hf` and `checkpoint import`
(peers that restore step 0 from the keeper: tests/integration/test_from_hf_swarm.py).
Every model here is made by the test with `transformers` (random weights, save_pretrained) and
its tokenizer.json with `tokenizers`: nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from peer.model.llama import LlamaStage, chain_forward
from protocol.checkpoint import verify_checkpoint
from protocol.spec import load_spec
from protocol.weights import weights_digest

from cli_helpers import invoke
from hf_helpers import keygen, make_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.timeout(600)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize(
    "kind",
    [
        dict(),
        dict(sharded=True),
        dict(tied=True),
        dict(rope_scaling=LLAMA3_ROPE, head_dim=16, sharded=True),
    ],
    ids=["untied", "sharded", "tied", "llama3-rope-head-dim"],
)
def test_spec_init_import_and_the_stages_give_the_models_logits(tmp_path, kind):
    hf = make_hf(tmp_path / "hf", **kind)
    if kind.get("sharded"):
        assert (hf / "model.safetensors.index.json").exists()
    key, pub = keygen(tmp_path)
    spec_path = tmp_path / "spec.toml"
    r = invoke("spec", "init", spec_path, "--from-hf", hf, "--run-id", "ft", "--trusted-key", pub)
    assert r.exit_code == 0, r.output
    spec = load_spec(spec_path)
    cfg = json.loads((hf / "config.json").read_text())
    assert spec.model.hidden_size == 32 and spec.model.num_key_value_heads == 2
    assert spec.model.tie_word_embeddings == kind.get("tied", False)
    assert [(s.start, s.end) for s in spec.stages] == [(0, 2), (2, 4)]
    assert spec.init.weights_sha256 == weights_digest(hf)
    assert spec.tokenizer.kind == "file" and spec.tokenizer.path == str((hf / "tokenizer.json").resolve())
    if "rope_scaling" in kind:
        assert spec.model.rope_scaling.model_dump() == LLAMA3_ROPE and spec.model.attn_head_dim == 16
    assert cfg["num_hidden_layers"] == 4

    out = tmp_path / "keeper-ckpts"
    r = invoke("checkpoint", "import", hf, "--spec", spec_path, "--signing-key", key, "--out", out)
    assert r.exit_code == 0, r.output
    stages = []
    for k in range(spec.num_stages):
        (path,) = sorted((out / f"stage-{k}").glob("step-*"))
        v = verify_checkpoint(path, spec, expected_stage=k)
        assert v.meta.step == 0
        module = LlamaStage.from_spec(spec, k)
        module.load_state_dict(dict(v.model_state), strict=False)
        stages.append(module)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = chain_forward(stages, ids), hf_model(ids).logits
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (ours - theirs).abs().max()


def test_a_model_outside_the_family_and_other_weights_are_refused_by_name(tmp_path):
    hf = make_hf(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    r = invoke("spec", "init", tmp_path / "x.toml", "--from-hf", hf)
    assert r.exit_code != 0 and "model_type is 'mistral'" in r.output, r.output
    (hf / "config.json").write_text(json.dumps(cfg))
    r = invoke("spec", "init", tmp_path / "x.toml", "--from-hf", hf, "--layers", "1,1")
    assert r.exit_code != 0 and "must rise strictly" in r.output, r.output

    key, pub = keygen(tmp_path)
    spec_path = tmp_path / "spec.toml"
    assert invoke("spec", "init", spec_path, "--from-hf", hf, "--trusted-key", pub, "--layers", "1").exit_code == 0
    assert [(s.start, s.end) for s in load_spec(spec_path).stages] == [(0, 1), (1, 4)]
    other = make_hf(tmp_path / "other", seed=1)  # same architecture, other weights
    r = invoke("checkpoint", "import", other, "--spec", spec_path, "--signing-key", key, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "init.weights_sha256" in r.output and "not the model this run" in r.output
