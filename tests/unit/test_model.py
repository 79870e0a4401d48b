"""The stage-built model against Hugging Face's LlamaForCausalLM, and deterministic init."""

import pytest
import torch

from peer.model.llama import (
    EMBED,
    HEAD,
    LlamaStage,
    build_stages,
    causal_lm_loss,
    chain_forward,
    stage_param_names,
)
from protocol.spec import preset_spec, spec_from_dict

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def make_spec(partition, *, seed=0, **model):
    """The tiny preset with the given layer partition and model overrides."""
    base = preset_spec("tiny", stages=1).model_dump()
    base["seed"] = seed
    base["model"].update(model, num_hidden_layers=partition[-1][1])
    base["stages"] = [{"start": a, "end": b} for a, b in partition]
    return spec_from_dict(base)


def perturb_norms(stages, seed=1):
    # Norm gains start at one; moving them makes the parity tests check that they are wired.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in stages:
            for p in s.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))


def merged_state(stages):
    sd = {}
    for s in stages:
        sd.update(s.state_dict())
    return sd


def hf_model(spec, state):
    cfg = transformers.LlamaConfig(**spec.model.hf_config_dict(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(state, strict=True)
    return model


def assert_rel_close(ours, theirs, what, rtol=1e-5):
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert err <= rtol * scale + 1e-8, f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


PARITY_CASES = {
    "one-stage": ([(0, 4)], {}),
    "two-even": ([(0, 2), (2, 4)], {}),
    "uneven-3": ([(0, 1), (1, 4), (4, 5)], {}),
    "mha": ([(0, 2), (2, 4)], {"num_key_value_heads": 4}),
    "gqa-4to1": ([(0, 3), (3, 4)], {"num_key_value_heads": 1}),
    "tied-one-stage": ([(0, 4)], {"tie_word_embeddings": True}),
    "tied-two-stages": ([(0, 1), (1, 4)], {"tie_word_embeddings": True}),
    # What Llama checkpoints use beyond the defaults: a head width other than hidden / heads,
    # and RoPE scaling (Llama 3.1's, with an original context short enough to bend the test's).
    "head-dim-24": ([(0, 2), (2, 4)], {"head_dim": 24}),
    "rope-linear": ([(0, 2), (2, 4)], {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "rope-llama3": (
        [(0, 1), (1, 4)],
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "head_dim": 16,
        },
    ),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_matches_hf_logits_loss_and_grads(case):
    partition, model = PARITY_CASES[case]
    spec = make_spec(partition, seed=3, rope_theta=5000.0, **model)
    stages = build_stages(spec)
    perturb_norms(stages)
    hf = hf_model(spec, merged_state(stages))
    ids = torch.randint(0, spec.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

    logits = chain_forward(stages, ids)
    loss = causal_lm_loss(logits, ids)
    loss.backward()
    out = hf(ids, labels=ids)
    out.loss.backward()

    assert logits.shape == (2, 12, spec.model.vocab_size)
    assert_rel_close(logits, out.logits, "logits")
    assert_rel_close(loss, out.loss, "loss")
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    ours = {n: p.grad for s in stages for n, p in s.named_parameters()}
    if spec.model.tie_word_embeddings and len(stages) > 1:
        # HF's one shared tensor gets the sum of what our two copies get.
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
        ours[EMBED] = ours[EMBED] + ours.pop(HEAD)
    assert ours.keys() == hf_grads.keys()
    for name, grad in ours.items():
        assert_rel_close(grad, hf_grads[name], f"grad of {name}")


def test_scaled_rope_really_changes_the_frequencies():
    from peer.model.llama import rope_inv_freq

    plain = make_spec([(0, 2)], rope_theta=5000.0).model
    scaled = make_spec(
        [(0, 2)],
        rope_theta=5000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
    ).model
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    assert torch.equal(a[:2], b[:2]) and torch.allclose(a[-1] / 8, b[-1])  # high kept, low scaled


def test_a_spec_refuses_rope_scaling_it_cannot_compute():
    from protocol.spec import SpecError

    with pytest.raises((SpecError, ValueError), match="rope_type"):
        make_spec([(0, 2)], rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises((SpecError, ValueError), match="high_freq_factor"):
        make_spec([(0, 2)], rope_scaling={"rope_type": "llama3", "factor": 2.0, "high_freq_factor": 0.5})


def test_tied_single_stage_shares_one_parameter():
    (stage,) = build_stages(make_spec([(0, 4)], tie_word_embeddings=True))
    assert stage.lm_head.weight is stage.model.embed_tokens.weight
    assert HEAD not in dict(stage.named_parameters())


def test_state_dict_names_are_hf_names_with_global_indices():
    spec = make_spec([(0, 1), (1, 4), (4, 5)])
    names = [stage_param_names(spec, k) for k in range(3)]
    assert names[1][0] == "model.layers.1.self_attn.q_proj.weight"
    assert names[1][-1] == "model.layers.3.post_attention_layernorm.weight"
    assert names[0][0] == EMBED and names[2][-2:] == ["model.norm.weight", HEAD]
    for k, stage in enumerate(build_stages(spec)):
        assert list(stage.state_dict()) == names[k]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec.model.hf_config_dict()))
    assert sum(names, []) == list(hf.state_dict())


def test_init_is_deterministic_per_stage():
    spec = make_spec([(0, 2), (2, 4)], seed=7)
    a, b = LlamaStage.from_spec(spec, 1), LlamaStage.from_spec(spec, 1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("tied", [False, True])
def test_every_partition_gives_the_same_model(tied):
    partitions = [[(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 4), (4, 5)], [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]]
    models = [merged_state(build_stages(make_spec(p, seed=11, tie_word_embeddings=tied))) for p in partitions]
    for other in models[1:]:
        assert other.keys() == models[0].keys()
        for name, t in models[0].items():
            assert torch.equal(t, other[name]), name
    if tied:
        assert torch.equal(models[1][HEAD], models[1][EMBED])


def test_seed_changes_every_matrix_and_init_has_the_right_scale():
    a = merged_state(build_stages(make_spec([(0, 4)], seed=0)))
    b = merged_state(build_stages(make_spec([(0, 4)], seed=1)))
    for name, t in a.items():
        if t.ndim == 1:
            assert torch.equal(t, torch.ones_like(t)) and torch.equal(b[name], t), name
        else:
            assert not torch.equal(t, b[name]), name
            assert abs(t.std().item() - 0.02) < 0.002, name
    # Distinct names draw distinct numbers, even for equal shapes.
    assert not torch.equal(a["model.layers.0.mlp.gate_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_stage_forward_checks_its_input():
    s0, s1 = build_stages(make_spec([(0, 2), (2, 4)]))
    with pytest.raises(ValueError, match="token ids"):
        s0(torch.randn(1, 4, 128))
    with pytest.raises(ValueError, match="hidden states"):
        s1(torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="stage 2 does not exist"):
        stage_param_names(make_spec([(0, 2), (2, 4)]), 2)
    hidden = s0(torch.zeros(1, 4, dtype=torch.long))
    assert hidden.shape == (1, 4, 128) and s1(hidden).shape == (1, 4, 257)
