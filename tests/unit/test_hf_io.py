"""Hugging Face checkpoints: stage-by-stage import, export, and the per-stage file format."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peer.model.hf_io as hf_io
from peer.model.hf_io import (
    CheckpointError,
    config_from_hf,
    export_hf_dir,
    load_stage_from_hf,
    load_stage_safetensors,
    save_stage_safetensors,
)
from peer.model.llama import EMBED, HEAD, LlamaStage, build_stages, chain_forward, stage_param_names
from protocol.spec import ModelSpec, preset_spec, spec_from_dict

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
IDS = torch.randint(0, 257, (2, 10), generator=torch.Generator().manual_seed(0))


def make_spec(partition, **model):
    base = preset_spec("tiny", stages=1).model_dump()
    base["model"].update(model)
    base["stages"] = [{"start": a, "end": b} for a, b in partition]
    return spec_from_dict(base)


def hf_checkpoint(path, spec, **save_kwargs):
    """A random HF model (norms moved off one) saved with save_pretrained; returns the model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.model.hf_config_dict())).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return model


def load_all(path, spec):
    return [load_stage_from_hf(path, spec, k) for k in range(spec.num_stages)]


def assert_same_logits(stages, hf_model):
    with torch.no_grad():
        ours, theirs = chain_forward(stages, IDS), hf_model(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


PARTITIONS = [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_checkpoint_loads_stage_by_stage(tmp_path, tied, sharded):
    spec = make_spec([(0, 4)], tie_word_embeddings=tied)
    model = hf_checkpoint(tmp_path, spec, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    if tied and not sharded:
        assert HEAD not in load_file(tmp_path / "model.safetensors")
    for partition in PARTITIONS:
        spec = make_spec(partition, tie_word_embeddings=tied)
        assert_same_logits(load_all(tmp_path, spec), model)


def test_only_the_stage_shards_are_opened(tmp_path, monkeypatch):
    spec = make_spec([(0, 2), (2, 4)])
    model = hf_checkpoint(tmp_path, spec, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {tmp_path / weight_map[n] for n in stage_param_names(spec, 1)}
    assert len(needed) < len(set(weight_map.values()))

    opened = []
    real_safe_open = hf_io.safe_open
    monkeypatch.setattr(hf_io, "safe_open", lambda path, **kw: opened.append(Path(path)) or real_safe_open(path, **kw))
    stage1 = load_stage_from_hf(tmp_path, spec, 1)
    assert set(opened) == needed and len(opened) == len(needed)

    # The same, the hard way: with every other shard gone, stage 1 still loads.
    for file in set(weight_map.values()):
        if tmp_path / file not in needed:
            (tmp_path / file).unlink()
    stage1_again = load_stage_from_hf(tmp_path, spec, 1)
    for name, t in stage1.state_dict().items():
        assert torch.equal(t, stage1_again.state_dict()[name])
    with torch.no_grad():
        hidden = model.model.embed_tokens(IDS)
        for layer in model.model.layers[:2]:
            hidden = layer(hidden, position_embeddings=model.model.rotary_emb(hidden, torch.arange(10)[None]))
    torch.testing.assert_close(stage1(hidden), model(IDS).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: missing, but the index lists"):
        load_stage_from_hf(tmp_path, spec, 0)


EXPORT_CASES = {
    "untied-2": ([(0, 2), (2, 4)], False, False),
    "untied-3-sharded": ([(0, 1), (1, 3), (3, 4)], False, True),
    "tied-1": ([(0, 4)], True, False),
    "tied-2-equal": ([(0, 2), (2, 4)], True, False),
    "tied-2-drifted": ([(0, 2), (2, 4)], True, True),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_round_trip(tmp_path, case):
    partition, tied, variant = EXPORT_CASES[case]
    spec = make_spec(partition, tie_word_embeddings=tied)
    stages = build_stages(spec)
    drifted = tied and variant
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in stages[-1].named_parameters():
            if p.ndim == 1 or (drifted and name == HEAD):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = export_hf_dir(
        spec,
        [s.state_dict() for s in stages],
        tmp_path / "export",
        max_shard_bytes=100_000 if variant and not tied else None,
    )

    config = json.loads((out / "config.json").read_text())
    # Multi-stage tied runs train untied copies: the export is tied only while they are equal.
    expect_tied = tied and not drifted
    assert config["tie_word_embeddings"] == expect_tied
    if variant and not tied:
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    assert_same_logits(stages, model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == expect_tied

    generated = model.generate(IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > IDS.shape[1]
    with torch.no_grad():
        assert generated[0, IDS.shape[1]].item() == chain_forward(stages, IDS[:1])[0, -1].argmax().item()

    # The exported directory is itself a checkpoint we can load stage by stage.
    assert_same_logits(load_all(out, spec), model)


def test_export_keeps_tied_when_the_two_copies_are_equal(tmp_path):
    spec = make_spec([(0, 2), (2, 4)], tie_word_embeddings=True)
    out = export_hf_dir(spec, [s.state_dict() for s in build_stages(spec)], tmp_path / "x")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert HEAD not in load_file(out / "model.safetensors")


def test_export_refuses_bad_input(tmp_path):
    spec = make_spec([(0, 2), (2, 4)])
    sds = [s.state_dict() for s in build_stages(spec)]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf_dir(spec, sds, tmp_path / "full")
    with pytest.raises(CheckpointError, match="one state dict per stage"):
        export_hf_dir(spec, sds[:1], tmp_path / "a")
    broken = dict(sds[1])
    del broken["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"stage 1 state dict: missing \['model.norm.weight'\]"):
        export_hf_dir(spec, [sds[0], broken], tmp_path / "b")
    nan = {**sds[1], "model.norm.weight": torch.full((128,), float("nan"))}
    with pytest.raises(CheckpointError, match="model.norm.weight.*NaN"):
        export_hf_dir(spec, [sds[0], nan], tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_config_from_hf_round_trips_and_reads_transformers_4_layout(tmp_path):
    spec = make_spec([(0, 4)], rope_theta=5000.0, tie_word_embeddings=True, num_key_value_heads=1)
    hf_checkpoint(tmp_path, spec)
    assert ModelSpec(**config_from_hf(tmp_path)) == spec.model
    v4 = spec.model.hf_config_dict()  # rope_theta at the top level, as transformers 4 writes it
    (tmp_path / "config.json").write_text(json.dumps(v4))
    assert ModelSpec(**config_from_hf(tmp_path)) == spec.model


def rewrite(path, **changes):
    tensors = load_file(path)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_checkpoints_give_clear_errors(tmp_path):
    spec = make_spec([(0, 2), (2, 4)])
    hf_checkpoint(tmp_path, spec)
    file = tmp_path / "model.safetensors"

    other = make_spec([(0, 2), (2, 4)], hidden_size=64, rope_theta=500.0)
    with pytest.raises(
        ValueError,
        match=r"hidden_size is 128 in config.json but 64 in the run spec.*rope_theta is 10000.0 in config.json but 500.0",
    ):
        load_stage_from_hf(tmp_path, other, 0)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    )
    with pytest.raises(CheckpointError, match="rope_scaling.rope_type is 'yarn'"):
        load_stage_from_hf(tmp_path, spec, 0)
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    )
    with pytest.raises(CheckpointError, match="RoPE scaling 'llama3' without factor"):
        load_stage_from_hf(tmp_path, spec, 0)
    # A scaling the spec does not have is a mismatch, named by its field.
    scaled = {"rope_type": "llama3", "rope_theta": config.get("rope_theta", 1e4), "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": scaled}))
    with pytest.raises(CheckpointError, match="rope_scaling is .* in config.json but None in the run spec"):
        load_stage_from_hf(tmp_path, spec, 0)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2'"):
        load_stage_from_hf(tmp_path, spec, 0)
    (tmp_path / "config.json").write_text(json.dumps(config))

    rewrite(file, model__layers__3__mlp__up_proj__weight=None)
    load_stage_from_hf(tmp_path, spec, 0)  # stage 0 does not need it
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.3.mlp.up_proj.weight' \(needed by stage 1\) is missing",
    ):
        load_stage_from_hf(tmp_path, spec, 1)

    rewrite(file, model__layers__1__self_attn__k_proj__weight=torch.zeros(128, 128))
    with pytest.raises(
        CheckpointError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(128, 128\), expected \(64, 128\)"
    ):
        load_stage_from_hf(tmp_path, spec, 0)

    bad = torch.zeros(64, 128)
    bad[3, 4] = float("nan")
    rewrite(file, model__layers__1__self_attn__k_proj__weight=bad)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' contains NaN"
    ):
        load_stage_from_hf(tmp_path, spec, 0)

    file.unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_stage_from_hf(tmp_path, spec, 0)


def test_stage_file_round_trip_and_errors(tmp_path):
    spec = make_spec([(0, 4)], tie_word_embeddings=True)
    (stage,) = build_stages(spec)
    path = save_stage_safetensors(stage, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with safe_open(path, framework="pt") as f:
        assert HEAD not in f.keys() and EMBED in f.keys()

    fresh = LlamaStage.from_spec(spec, 0, init=False)
    load_stage_safetensors(path, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for name, t in stage.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]), name

    before = {n: t.clone() for n, t in fresh.state_dict().items()}
    bad = torch.ones(128)
    bad[0] = float("inf")
    rewrite(path, model__norm__weight=bad)
    with pytest.raises(CheckpointError, match="'model.norm.weight' contains NaN or Inf"):
        load_stage_safetensors(path, fresh)
    rewrite(path, model__norm__weight=torch.ones(64))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(64,\), expected \(128,\)"):
        load_stage_safetensors(path, fresh)
    rewrite(path, model__norm__weight=None)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.norm.weight'\]"):
        load_stage_safetensors(path, fresh)
    for name, t in fresh.state_dict().items():  # refused files never touch the module
        assert torch.equal(t, before[name]), name

    with torch.no_grad():
        stage.model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match="contains NaN"):
        save_stage_safetensors(stage, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_head_dim_and_llama3_rope_scaling_are_read_from_a_transformers_config(tmp_path):
    """What a Llama 3 config.json says (as transformers itself saves it) becomes the spec's."""
    import transformers

    from peer.model.hf_io import config_from_hf
    from protocol.spec import ModelSpec

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        rope_theta=5e5,
        rope_scaling=dict(rope),  # transformers adds rope_theta to the dict it is given
    )
    cfg.save_pretrained(tmp_path)
    model = ModelSpec(**config_from_hf(tmp_path))
    assert model.attn_head_dim == 24 and model.head_dim == 24
    assert model.rope_scaling is not None and model.rope_scaling.model_dump() == rope
    assert model.rope_theta == 5e5
