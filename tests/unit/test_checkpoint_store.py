"""Signed stage checkpoints: atomic writes, listing, pruning and every refusal of the trust policy.

Real keys, real safetensors files, real model-signing signatures (the stock CLI and a writer
killed mid-write: tests/integration/test_checkpoint_store_processes.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from peer.checkpoints import store as cs
from peer.checkpoints.store import CheckpointStore, list_checkpoints, load_into_module, load_verified, write_checkpoint
from peer.model.llama import LlamaStage, stage_param_shapes
from protocol import signing
from protocol.checkpoint import CheckpointRefused, manifest_digest, verify_checkpoint
from protocol.spec import preset_spec

from checkpoint_helpers import flip_byte, trained_stage, write_signed
from conftest import spec_trusting


def _pub(keys, name) -> str:
    return keys[name][1].read_text()


@pytest.fixture(scope="module")
def spec(keys):
    return spec_trusting(keys, "a", "b")


@pytest.fixture(scope="module")
def stage0(spec):
    return trained_stage(spec, 0)


@pytest.fixture(scope="module")
def good(tmp_path_factory, spec, stage0, keys):
    """A pristine checkpoint of stage 0, step 5, signed by trusted key a; tests copy it."""
    module, opt = stage0
    return write_signed(tmp_path_factory.mktemp("good") / "step-5", spec, module, opt, keys)


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good.path, d)
    return d


def _refused(directory, spec, match, **kw):
    with pytest.raises(CheckpointRefused, match=match) as info:
        verify_checkpoint(directory, spec, **kw)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# a good checkpoint


def test_good_checkpoint_roundtrip(good, spec, stage0, keys):
    module, opt = stage0
    v = load_verified(good.path, spec, 0)
    assert v.meta.run_id == spec.run_id and v.meta.spec_digest == spec.digest()
    assert (v.meta.stage, v.meta.step, v.meta.tokens_seen, v.meta.parent_digest) == (0, 5, 5000, None)
    assert v.signers == (keys["a"][2],) and v.untrusted_signers == ()
    assert v.manifest_digest == good.manifest_digest == manifest_digest(v.files)
    assert set(v.files) == {"checkpoint.json", "model.safetensors", "optimizer.safetensors"}
    sd = module.state_dict()
    assert v.model_state.keys() == sd.keys() == stage_param_shapes(spec, 0).keys()
    for name, t in sd.items():
        assert torch.equal(v.model_state[name], t)
    record = v.to_record()
    from protocol.records import CheckpointRecordModel

    CheckpointRecordModel.parse_obj(record)
    assert record["total_bytes"] == sum((good.path / n).stat().st_size for n in v.files)

    # The optimizer state goes back into a fresh optimizer and continues identically.
    fresh = LlamaStage.from_spec(spec, 0, init=False)
    load_into_module(v, fresh)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(v.optimizer_state)
    for (name, p), p2 in zip(module.named_parameters(), fresh.parameters()):
        assert torch.equal(p, p2), name
        s1, s2 = opt.state[p], opt2.state[p2]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s1["step"]) == float(s2["step"])


def test_verify_without_loading_tensors(good, spec):
    v = verify_checkpoint(good.path, spec, load_tensors=False)
    assert not v.tensors_loaded and v.manifest_digest == good.manifest_digest
    with pytest.raises(RuntimeError, match="without loading"):
        v.model_state


# ---------------------------------------------------------------------------------------------
# tampering: every one refused, with the reason


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "checkpoint.json"])
def test_flipped_byte_refused(ckpt, spec, name):
    flip_byte(ckpt / name, -2 if name == "checkpoint.json" else -1)
    msg = _refused(ckpt, spec, f"{name}: content does not match the signed digest")
    assert "signed sha256" in msg
    # The cheap no-load mode refuses the same way.
    _refused(ckpt, spec, name, load_tensors=False)


def test_file_swapped_from_another_checkpoint(ckpt, spec, keys, tmp_path):
    module, opt = trained_stage(spec, 0, seed=1)
    other = write_signed(tmp_path / "other", spec, module, opt, keys, step=6)
    shutil.copy(other.path / "model.safetensors", ckpt / "model.safetensors")
    _refused(ckpt, spec, "model.safetensors: content does not match the signed digest")


def test_signature_swapped_from_another_checkpoint(ckpt, spec, keys, tmp_path):
    module, opt = trained_stage(spec, 0, seed=1)
    other = write_signed(tmp_path / "other", spec, module, opt, keys, step=6)
    fp = keys["a"][2]
    shutil.copy(other.path / "signatures" / f"{fp}.sig", ckpt / "signatures" / f"{fp}.sig")
    _refused(ckpt, spec, "content does not match the signed digest")


def test_truncated_file(ckpt, spec):
    path = ckpt / "model.safetensors"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    msg = _refused(ckpt, spec, "model.safetensors: content does not match the signed digest")
    assert f"{size // 2} bytes" in msg and "truncated" in msg


def test_untrusted_signer_only(tmp_path, spec, stage0, keys):
    module, opt = stage0
    w = write_signed(tmp_path / "c", spec, module, opt, keys, signers=("mallory",))
    msg = _refused(w.path, spec, "0 valid signature")
    assert f"signatures/{keys['mallory'][2]}.sig is by key {keys['mallory'][2]}, which is not trusted" in msg
    assert keys["a"][2] in msg  # names the keys that would have been trusted


def test_untrusted_extra_signature_is_ignored(ckpt, spec, keys):
    signing.sign_dir(ckpt, keys["mallory"][0])
    v = verify_checkpoint(ckpt, spec)
    assert v.signers == (keys["a"][2],) and v.untrusted_signers == (keys["mallory"][2],)


def test_signature_under_a_trusted_name_by_another_key(ckpt, spec, keys):
    sig = signing.sign_dir(ckpt, keys["mallory"][0])
    fp_b = keys["b"][2]
    os.replace(sig, ckpt / "signatures" / f"{fp_b}.sig")
    _refused(ckpt, spec, f"invalid signature for trusted key {fp_b}")


def test_checkpoint_of_another_spec(tmp_path, spec, stage0, keys):
    other_spec = preset_spec("tiny", stages=2, seed=7, trusted_keys=spec.trust.trusted_keys)
    module, opt = stage0
    w = write_signed(tmp_path / "c", other_spec, module, opt, keys)
    msg = _refused(w.path, spec, "spec_digest")
    assert other_spec.digest() in msg and spec.digest() in msg and "another spec" in msg
    assert verify_checkpoint(w.path, other_spec).meta.spec_digest == other_spec.digest()


def test_other_run_id(tmp_path, stage0, keys, spec):
    other = preset_spec("tiny", stages=2, run_id="other", trusted_keys=spec.trust.trusted_keys)
    module, opt = stage0
    w = write_signed(tmp_path / "c", other, module, opt, keys)
    _refused(w.path, spec, "spec_digest")  # a run id is part of the spec, so its digest differs first


def test_older_step_replayed(good, spec):
    msg = _refused(good.path, spec, "rollback refused", held_step=6)
    assert "step is 5" in msg and "(6)" in msg
    assert verify_checkpoint(good.path, spec, held_step=5).meta.step == 5  # the same step is no rollback


def test_wrong_stage(good, spec):
    _refused(good.path, spec, "stage is 0, expected 1", expected_stage=1)


def test_missing_signature(ckpt, spec):
    shutil.rmtree(ckpt / "signatures")
    _refused(ckpt, spec, "no signature")


def test_extra_unsigned_file(ckpt, spec):
    (ckpt / "notes.txt").write_text("hello")
    _refused(ckpt, spec, r"extra unsigned file\(s\): notes.txt")


def test_extra_file_in_signatures_dir(ckpt, spec):
    (ckpt / "signatures" / "payload.bin").write_bytes(b"\0")
    _refused(ckpt, spec, r"unexpected file\(s\) in signatures/: signatures/payload.bin")


def test_missing_signed_file(ckpt, spec):
    (ckpt / "optimizer.safetensors").unlink()
    _refused(ckpt, spec, r"signed file\(s\) missing: optimizer.safetensors")


def test_min_signatures(ckpt, spec, keys):
    msg = _refused(ckpt, spec, r"1 valid signature\(s\) from trusted keys, 2 required", min_signatures=2)
    assert keys["a"][2] in msg
    signing.sign_dir(ckpt, keys["b"][0])
    v = verify_checkpoint(ckpt, spec, min_signatures=2)
    assert v.signers == tuple(sorted([keys["a"][2], keys["b"][2]]))
    # A co-signature does not change the checkpoint's id.
    assert v.manifest_digest == verify_checkpoint(ckpt, spec).manifest_digest


def test_min_signatures_from_spec(tmp_path, keys, stage0):
    spec2 = preset_spec("tiny", stages=2, trusted_keys=(_pub(keys, "a"), _pub(keys, "b")), trust=dict(min_signatures=2))
    module, opt = stage0
    w = write_signed(tmp_path / "one", spec2, module, opt, keys, signers=("a",))
    _refused(w.path, spec2, "2 required")
    w = write_signed(tmp_path / "two", spec2, module, opt, keys, signers=("a", "b"))
    assert len(verify_checkpoint(w.path, spec2).signers) == 2


def test_signatures_that_disagree(ckpt, spec, keys, tmp_path):
    # b signs a different model file, then the original is put back: a's signature matches the
    # files, b's does not, and the checkpoint is refused rather than half-trusted.
    original = (ckpt / "model.safetensors").read_bytes()
    flip_byte(ckpt / "model.safetensors")
    signing.sign_dir(ckpt, keys["b"][0])
    (ckpt / "model.safetensors").write_bytes(original)
    _refused(ckpt, spec, "signatures disagree")


def test_no_trusted_keys(good, stage0):
    bare = preset_spec("tiny", stages=2)
    _refused(good.path, bare, "no trusted keys")


def test_explicit_trusted_keys_replace_the_spec(good, spec, keys):
    _refused(good.path, spec, "0 valid signature", trusted_keys=[_pub(keys, "b")])
    assert verify_checkpoint(good.path, None, trusted_keys=[_pub(keys, "a")]).meta.step == 5


# ---------------------------------------------------------------------------------------------
# signed but still refused: the content itself


def _signed_with(tmp_path, spec, keys, model_state, name="crafted", **meta_overrides) -> Path:
    """A checkpoint built by hand and signed by trusted key a: the signature is fine, the content not."""
    from safetensors.torch import save_file

    d = tmp_path / name
    d.mkdir()
    save_file(model_state, d / "model.safetensors")
    meta = dict(
        format_version=1,
        run_id=spec.run_id,
        spec_digest=spec.digest(),
        stage=0,
        step=1,
        tokens_seen=0,
        parent_digest=None,
        created=1.0,
    )
    meta.update(meta_overrides)
    (d / "checkpoint.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not ...}))  # ... drops a field
    signing.sign_dir(d, keys["a"][0])
    return d


def test_non_finite_weights(tmp_path, spec, keys, stage0):
    sd = {k: v.clone() for k, v in stage0[0].state_dict().items()}
    sd["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    d = _signed_with(tmp_path, spec, keys, sd)
    _refused(d, spec, r"non-finite values \(NaN or inf\) in model.layers.0.mlp.up_proj.weight")


def test_wrong_names_and_shapes(tmp_path, spec, keys, stage0):
    sd = {k: v.clone() for k, v in stage0[0].state_dict().items()}
    shapes = stage_param_shapes(spec, 0)
    del sd["model.layers.1.input_layernorm.weight"]
    sd["model.layers.9.bogus"] = torch.zeros(2)
    d = _signed_with(tmp_path, spec, keys, sd)
    msg = _refused(d, spec, "missing tensor", expected_shapes=shapes)
    assert "model.layers.1.input_layernorm.weight" in msg and "unexpected tensor(s) model.layers.9.bogus" in msg

    sd = {k: v.clone() for k, v in stage0[0].state_dict().items()}
    sd["model.embed_tokens.weight"] = torch.zeros(10, spec.model.hidden_size)
    d2 = _signed_with(tmp_path, spec, keys, sd, name="crafted2")
    _refused(
        d2, spec, r"model.embed_tokens.weight has shape \(10, 128\), expected \(257, 128\)", expected_shapes=shapes
    )
    # load_verified fills in the expected shapes from the spec.
    with pytest.raises(CheckpointRefused, match="has shape"):
        load_verified(d2, spec, 0)


def test_garbage_model_file(tmp_path, spec, keys):
    d = tmp_path / "crafted"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    (d / "checkpoint.json").write_text(
        json.dumps(
            dict(
                format_version=1,
                run_id=spec.run_id,
                spec_digest=spec.digest(),
                stage=0,
                step=1,
                tokens_seen=0,
                created=1.0,
            )
        )
    )
    signing.sign_dir(d, keys["a"][0])
    _refused(d, spec, "model.safetensors: not a loadable safetensors file")


def test_unknown_field_in_metadata(tmp_path, spec, keys, stage0):
    d = _signed_with(tmp_path, spec, keys, stage0[0].state_dict(), surprise=1)
    _refused(d, spec, "checkpoint.json: surprise: unknown field")


def test_newer_or_missing_format_version(tmp_path, spec, keys, stage0):
    d = _signed_with(tmp_path, spec, keys, stage0[0].state_dict(), format_version=2)
    _refused(d, spec, "format_version is 2")
    d = _signed_with(tmp_path, spec, keys, stage0[0].state_dict(), name="noversion", format_version=...)
    _refused(d, spec, "format_version is missing")


def test_signed_file_outside_the_format(tmp_path, spec, keys, stage0):
    from safetensors.torch import save_file

    d = tmp_path / "crafted"
    d.mkdir()
    save_file(stage0[0].state_dict(), d / "model.safetensors")
    (d / "checkpoint.json").write_text(
        json.dumps(
            dict(
                format_version=1,
                run_id=spec.run_id,
                spec_digest=spec.digest(),
                stage=0,
                step=1,
                tokens_seen=0,
                created=1.0,
            )
        )
    )
    (d / "run.py").write_text("import os\n")
    signing.sign_dir(d, keys["a"][0])
    _refused(d, spec, r"signed file\(s\) run.py are not part of a checkpoint")


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_crash_before_rename_leaves_nothing_complete(tmp_path, spec, stage0, keys, monkeypatch):
    def crash(tmp, target):
        assert (tmp / "signatures").is_dir() and (tmp / "model.safetensors").is_file()  # fully written
        raise OSError("simulated crash between writing and rename")

    monkeypatch.setattr(cs, "_publish", crash)
    module, opt = stage0
    root = tmp_path / "store"
    target = root / "stage-0" / "step-0000000005"
    with pytest.raises(OSError, match="simulated crash"):
        write_signed(target, spec, module, opt, keys)
    assert not target.exists()
    assert list((root / "stage-0").iterdir()) == []  # the temporary directory is cleaned up
    assert list_checkpoints(root) == []


def test_crash_while_signing(tmp_path, spec, stage0, keys, monkeypatch):
    def crash(directory, key):
        raise KeyboardInterrupt

    monkeypatch.setattr(signing, "sign_dir", crash)
    module, opt = stage0
    target = tmp_path / "store" / "stage-0" / "step-0000000005"
    with pytest.raises(KeyboardInterrupt):
        write_signed(target, spec, module, opt, keys)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_listing_ignores_incomplete_dirs(tmp_path, good, spec):
    root = tmp_path / "store"
    shutil.copytree(good.path, root / "stage-0" / "step-0000000005")
    (root / "stage-0" / "step-0000000009").mkdir()  # empty
    no_sig = root / "stage-0" / "step-0000000010"
    shutil.copytree(good.path, no_sig)
    shutil.rmtree(no_sig / "signatures")
    no_meta = root / "stage-0" / "step-0000000011"
    shutil.copytree(good.path, no_meta)
    (no_meta / "checkpoint.json").unlink()
    shutil.copytree(good.path, root / "stage-0" / ".tmp-step-0000000012-abcd" / "step-0000000012")
    assert [c.path.name for c in list_checkpoints(root)] == ["step-0000000005"]


def test_refuses_to_overwrite_or_write_unsigned(good, spec, stage0):
    module, _ = stage0
    with pytest.raises(FileExistsError):
        write_checkpoint(
            good.path,
            spec=spec,
            stage=0,
            step=5,
            tokens_seen=0,
            model_state=module.state_dict(),
            key_paths=[Path("unused.pem")],
        )
    with pytest.raises(ValueError, match="signing key"):
        write_checkpoint(
            good.path.parent / "new",
            spec=spec,
            stage=0,
            step=5,
            tokens_seen=0,
            model_state=module.state_dict(),
            key_paths=[],
        )


# ---------------------------------------------------------------------------------------------
# the store


def test_store_lists_newest_first_links_parents_and_prunes(tmp_path, spec, keys):
    root = tmp_path / "store"
    store = CheckpointStore(root, spec, key_paths=[keys["a"][0]], keep=2)
    module, opt = trained_stage(spec, 1)
    written = [
        store.save(1, step, module.state_dict(), opt.state_dict(), tokens_seen=step * 10, prune=False)
        for step in (1, 2, 3)
    ]
    assert [c.meta.step for c in store.list(1)] == [3, 2, 1]
    assert store.list(0) == []
    assert written[0].meta.parent_digest is None
    assert written[1].meta.parent_digest == written[0].manifest_digest
    assert written[2].meta.parent_digest == written[1].manifest_digest
    assert verify_checkpoint(written[0].path, spec).manifest_digest == written[0].manifest_digest
    store.save(1, 4, module.state_dict(), tokens_seen=40)
    assert [c.meta.step for c in store.list(1)] == [4, 3]
    assert not any(p.name.startswith(".tmp-") for p in (root / "stage-1").iterdir())
    v = store.latest_verified(1)
    assert v.meta.step == 4 and v.optimizer_state is None
    assert store.latest_verified(1, held_step=5) is None


def test_prune_never_deletes_the_newest_verified(tmp_path, spec, keys):
    root = tmp_path / "store"
    module, opt = trained_stage(spec, 0)
    trusted = CheckpointStore(root, spec, key_paths=[keys["a"][0]], keep=2)
    trusted.save(0, 1, module.state_dict())
    # A peer whose key the spec does not trust keeps writing later checkpoints to the same store.
    local = CheckpointStore(root, spec, key_paths=[keys["mallory"][0]], keep=2)
    for step in (2, 3, 4):
        local.save(0, step, module.state_dict())
    assert [c.meta.step for c in local.list(0)] == [4, 3, 1]
    assert local.latest_verified(0).meta.step == 1
    assert local.prune(0, keep=1) == [root / "stage-0" / "step-0000000003"]
    assert [c.meta.step for c in local.list(0)] == [4, 1]


def test_prune_leaves_other_specs_alone(tmp_path, spec, keys):
    root = tmp_path / "store"
    module, _ = trained_stage(spec, 0)
    other_spec = preset_spec("tiny", stages=2, seed=3, trusted_keys=spec.trust.trusted_keys)
    write_checkpoint(
        root / "stage-0" / "step-0000000001",
        spec=other_spec,
        stage=0,
        step=1,
        tokens_seen=0,
        model_state=module.state_dict(),
        key_paths=[keys["a"][0]],
    )
    store = CheckpointStore(root, spec, key_paths=[keys["a"][0]], keep=1)
    for step in (2, 3):
        store.save(0, step, module.state_dict())
    assert [c.meta.step for c in list_checkpoints(root, stage=0)] == [3, 1]


def test_latest_verified_skips_a_damaged_newest(tmp_path, spec, keys):
    root = tmp_path / "store"
    module, _ = trained_stage(spec, 0)
    store = CheckpointStore(root, spec, key_paths=[keys["a"][0]], keep=5)
    store.save(0, 1, module.state_dict())
    w = store.save(0, 2, module.state_dict())
    flip_byte(w.path / "model.safetensors")
    assert store.latest_verified(0).meta.step == 1
    with pytest.raises(CheckpointRefused, match="model.safetensors"):
        store.load(w.path, 0)


def test_tied_single_stage_saves_the_shared_tensor_once(tmp_path, keys):
    spec1 = preset_spec("tiny", stages=1, trusted_keys=(_pub(keys, "a"),), model=dict(tie_word_embeddings=True))
    module = LlamaStage.from_spec(spec1, 0)
    assert "lm_head.weight" in module.state_dict()
    w = write_checkpoint(
        tmp_path / "c",
        spec=spec1,
        stage=0,
        step=1,
        tokens_seen=0,
        model_state=module.state_dict(),
        key_paths=[keys["a"][0]],
    )
    v = load_verified(w.path, spec1, 0)
    assert "lm_head.weight" not in v.model_state
    fresh = LlamaStage.from_spec(spec1, 0, init=False)
    load_into_module(v, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, module.lm_head.weight)
