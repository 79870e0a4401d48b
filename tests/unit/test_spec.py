"""The run spec: validation errors that name the field, a stable digest, the presets, and
``swarmtrain spec init``."""

from __future__ import annotations

import json

import pytest
import tomllib

from peer.model.llama import stage_param_shapes
from protocol import signing
from protocol.spec import (
    RunSpec,
    SpecError,
    load_spec,
    preset_spec,
    spec_from_dict,
    spec_from_json,
    spec_from_toml,
)

from cli_helpers import run


def base() -> dict:
    """A valid spec as plain data, to break one field at a time."""
    return json.loads(preset_spec("tiny", stages=2).canonical_json())


def invalid(mutate) -> str:
    data = base()
    mutate(data)
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    return str(err.value)


# --- validation errors name the field ---------------------------------------------------------


@pytest.mark.parametrize(
    "stages, expected",
    [
        ([{"start": 0, "end": 3}, {"start": 2, "end": 4}], ("stages[1]", "overlapping")),
        ([{"start": 0, "end": 1}, {"start": 2, "end": 4}], ("stages[1]", "layers 1..1 are in no stage")),
        ([{"start": 0, "end": 1}, {"start": 1, "end": 3}], ("stages", "model.num_hidden_layers is 4")),
        ([{"start": 1, "end": 1}, {"start": 1, "end": 4}], ("stages.0", "stage range [1, 1) is empty")),
    ],
    ids=["overlapping", "gap", "short of the layers", "empty stage"],
)
def test_bad_partition_is_named(stages, expected):
    msg = invalid(lambda d: d.update(stages=stages))
    assert all(text in msg for text in expected), msg


def test_missing_stages():
    msg = invalid(lambda d: d.pop("stages"))
    assert "stages: Field required" in msg
    msg = invalid(lambda d: d.update(stages=[]))
    assert "stages" in msg and "at least one stage" in msg


def test_heads_must_divide_hidden():
    msg = invalid(lambda d: d["model"].update(num_attention_heads=3))
    assert "model.num_attention_heads (3) must divide model.hidden_size (128)" in msg


def test_kv_heads_must_divide_heads():
    msg = invalid(lambda d: d["model"].update(num_key_value_heads=3))
    assert "model.num_key_value_heads (3) must divide model.num_attention_heads (4)" in msg


def test_unknown_fields_are_named():
    assert "model.hidden_sise: unknown field" in invalid(lambda d: d["model"].update(hidden_sise=3))
    assert "colour: unknown field" in invalid(lambda d: d.update(colour="red"))
    assert "training.lrr: unknown field" in invalid(lambda d: d["training"].update(lrr=1.0))


def test_seq_len_beyond_max_positions():
    msg = invalid(lambda d: d["training"].update(seq_len=512))
    assert "training.seq_len exceeds model.max_position_embeddings" in msg


def test_bad_tokenizer():
    assert "tokenizer.kind" in invalid(lambda d: d.update(tokenizer={"kind": "sentencepiece"}))
    msg = invalid(lambda d: d.update(tokenizer={"kind": "file", "path": "tok.json"}))
    assert "tokenizer.path and tokenizer.sha256" in msg
    msg = invalid(lambda d: d.update(tokenizer={"kind": "file", "path": "tok.json", "sha256": "ABC"}))
    assert "tokenizer.sha256 must be 64 lowercase hex digits" in msg
    msg = invalid(lambda d: d["model"].update(vocab_size=100))
    assert "model.vocab_size must be >= 257 for the byte tokenizer" in msg


def test_wrong_types_and_ranges_are_named():
    assert "model.hidden_size" in invalid(lambda d: d["model"].update(hidden_size="big"))
    assert "training.lr" in invalid(lambda d: d["training"].update(lr=-1.0))
    assert "run_id" in invalid(lambda d: d.update(run_id="has space"))
    assert "compression.activations" in invalid(lambda d: d["compression"].update(activations="zip"))
    assert "trust.trusted_keys[0] is not a PEM public key" in invalid(
        lambda d: d["trust"].update(trusted_keys=["not a key"])
    )


def test_malformed_documents():
    with pytest.raises(SpecError, match="not valid TOML"):
        spec_from_toml("run_id = ")
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_json("{")
    with pytest.raises(SpecError, match="expected a JSON object"):
        spec_from_json("[1, 2]")
    with pytest.raises(SpecError, match="cannot read run spec"):
        load_spec("/nonexistent/spec.toml")


# --- the digest ----------------------------------------------------------------------------------


def test_digest_is_stable_across_save_load_and_key_order(tmp_path):
    spec = preset_spec("tiny", stages=2)
    path = tmp_path / "spec.toml"
    spec.save(path)
    loaded = load_spec(path)
    assert loaded == spec and loaded.digest() == spec.digest()
    assert spec_from_toml(loaded.to_toml()).digest() == spec.digest()
    assert spec_from_json(spec.canonical_json()).digest() == spec.digest()

    # The same spec written with its keys (and sections) in another order.
    data = tomllib.loads(path.read_text())
    reordered = {
        k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(data.items()))
    }
    assert list(reordered) != list(data)
    assert spec_from_dict(reordered).digest() == spec.digest()
    # Defaults written out explicitly or left implicit: the same spec, the same digest.
    minimal = {
        "run_id": data["run_id"],
        "model": data["model"],
        "stages": data["stages"],
        "training": data["training"],
        "trust": data["trust"],
    }
    assert spec_from_dict(minimal).digest() == spec.digest()
    assert len(spec.digest()) == 64 and spec.short_digest == spec.digest()[:16]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(run_id="other"),
        lambda d: d.update(seed=1),
        lambda d: d["model"].update(rope_theta=20000.0),
        lambda d: d["model"].update(tie_word_embeddings=True),
        lambda d: d.update(stages=[{"start": 0, "end": 1}, {"start": 1, "end": 4}]),
        lambda d: d["training"].update(lr=0.0031),
        lambda d: d["training"].update(target_batch_size=33),
        lambda d: d["compression"].update(gradients="fp16"),
        lambda d: d["trust"].update(min_signatures=2),
        lambda d: d["trust"].update(accept_untrusted_live_state=False),
    ],
)
def test_any_change_gives_a_new_digest(change):
    data = base()
    before = spec_from_dict(data).digest()
    change(data)
    assert spec_from_dict(data).digest() != before


def test_spec_is_immutable():
    spec = preset_spec("tiny")
    with pytest.raises(Exception):
        spec.run_id = "other"  # type: ignore[misc]


# --- presets -------------------------------------------------------------------------------------


def total_params(spec: RunSpec) -> int:
    total = 0
    for k in range(spec.num_stages):
        for shape in stage_param_shapes(spec, k).values():
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def test_preset_sizes():
    tiny = preset_spec("tiny")
    assert 0.5e6 <= total_params(tiny) <= 1.5e6, total_params(tiny)
    base_spec = preset_spec("base")
    assert 0.9e9 <= total_params(base_spec) <= 1.2e9, total_params(base_spec)
    small = preset_spec("small")
    assert 15e6 <= total_params(small) <= 40e6, total_params(small)
    # Stage counts and partitions of the presets are valid and cover every layer.
    for spec in (tiny, small, base_spec):
        assert spec.stages[0].start == 0 and spec.stages[-1].end == spec.model.num_hidden_layers


def test_preset_options():
    spec = preset_spec("tiny", stages=4, run_id="r1", seed=7, training={"lr": 0.01})
    assert spec.num_stages == 4 and [(s.start, s.end) for s in spec.stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert spec.run_id == "r1" and spec.seed == 7 and spec.training.lr == 0.01
    assert spec.training.micro_batch_size == 8  # other preset values are kept
    with pytest.raises(SpecError, match="unknown preset"):
        preset_spec("huge")
    with pytest.raises(SpecError, match="--stages must be between 1 and the number of layers"):
        preset_spec("tiny", stages=5)


# --- spec init / show ----------------------------------------------------------------------------


def test_spec_init_writes_a_valid_spec(tmp_path):
    out = tmp_path / "spec.toml"
    r = run("spec", "init", out, "--preset", "tiny", "--stages", "4", "--run-id", "myrun", "--seed", "3")
    assert r.exit_code == 0, r.output
    spec = load_spec(out)
    assert spec.num_stages == 4 and spec.run_id == "myrun" and spec.seed == 3
    assert spec.digest() in r.output
    # Refuses to overwrite without --force.
    r = run("spec", "init", out)
    assert r.exit_code != 0 and "exists" in r.output
    r = run("spec", "init", out, "--force", "--stages", "2")
    assert r.exit_code == 0 and load_spec(out).num_stages == 2
    # Too many stages: a clear error, nothing written.
    r = run("spec", "init", tmp_path / "bad.toml", "--stages", "9")
    assert r.exit_code != 0 and "--stages must be between" in r.output and not (tmp_path / "bad.toml").exists()


def test_spec_init_with_trusted_keys(tmp_path):
    _, pub_a, _ = signing.write_keypair(tmp_path / "a.pem")
    _, pub_b, _ = signing.write_keypair(tmp_path / "b.pem")
    out = tmp_path / "spec.toml"
    r = run("spec", "init", out, "--trusted-key", pub_a, "--trusted-key", pub_b, "--min-signatures", "2")
    assert r.exit_code == 0, r.output
    spec = load_spec(out)
    assert spec.trust.trusted_keys == (pub_a.read_text().strip() + "\n", pub_b.read_text().strip() + "\n")
    assert spec.trust.min_signatures == 2
    # A private key (or any non-public-key file) is refused.
    r = run("spec", "init", tmp_path / "x.toml", "--trusted-key", tmp_path / "a.pem")
    assert r.exit_code != 0 and "not a PEM public key" in r.output


def test_spec_show(tmp_path):
    out = tmp_path / "spec.toml"
    run("spec", "init", out)
    spec = load_spec(out)
    r = run("spec", "show", out)
    assert r.exit_code == 0 and spec.digest() in r.output and "stage 1  layers [2, 4) + norm, LM head" in r.output
    r = run("spec", "show", out, "--json")
    assert json.loads(r.output) == json.loads(spec.canonical_json())
    bad = tmp_path / "bad.toml"
    bad.write_text(out.read_text().replace("num_attention_heads = 4", "num_attention_heads = 3"))
    r = run("spec", "show", bad)
    assert r.exit_code != 0 and "model.num_attention_heads (3) must divide" in r.output


# --- digests stay stable as the spec grows -------------------------------------------------------

# The digest of `spec init --preset tiny --stages 2` as of spec format 1 (swarmtrain 0.1.0). Peers of
# that version key every DHT record and RPC by it: it must never change for the same spec.
TINY_2_STAGES_DIGEST = "7e9c1b25451cceb22c397613954ebb198ef27236dfc7e870406a297846aca184"


def test_the_digest_of_a_preset_spec_is_pinned():
    assert preset_spec("tiny", stages=2).digest() == TINY_2_STAGES_DIGEST


def test_a_new_field_at_its_default_leaves_the_digest_unchanged():
    from typing import Literal

    from protocol.spec import RunSpec, TrainingSpec

    class RunSpecWithMode(RunSpec):  # what a later issue adds: a field with a default
        averaging: Literal["per_step", "outer"] = "per_step"

    class TrainingWithH(TrainingSpec):
        inner_steps: int = 30

    base = preset_spec("tiny", stages=2)
    fields = base.model_dump()
    assert RunSpecWithMode(**fields).digest() == base.digest()
    assert RunSpecWithMode(**fields, averaging="outer").digest() != base.digest()
    assert TrainingWithH(**fields["training"]).canonical_dict() == base.training.canonical_dict()
    assert TrainingWithH(**fields["training"], inner_steps=10).canonical_dict() != base.training.canonical_dict()


def test_a_format_1_field_at_its_default_still_counts():
    base = preset_spec("tiny", stages=2)
    assert "seed" in base.canonical_dict() and base.seed == 0
    assert "rope_theta" in base.canonical_dict()["model"]
