"""A Hugging Face Llama as a run's signed step 0, in a real swarm: peers restore step 0 from the
keeper over P2P (or refuse to start from random weights), train, and the export loads back in
transformers. Every model here is made by the test (random weights, save_pretrained): nothing is
downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol.spec import load_spec

from cli_helpers import invoke
from hf_helpers import keygen, make_hf

transformers = pytest.importorskip("transformers")


tokenizers = pytest.importorskip("tokenizers")


pytestmark = pytest.mark.timeout(600)


def patterned_text(directory: Path) -> Path:
    """Text in the test tokenizer's words with a pattern a model learns within a minute."""
    directory.mkdir()
    line = " ".join(f"w{i % 12}" for i in range(96))
    for k in range(3):
        (directory / f"part{k}.txt").write_text("\n".join([line] * 200) + "\n")
    return directory


@pytest.mark.timeout(900)
def test_peers_restore_step_0_from_the_keeper_train_and_export(tmp_path):
    """A peer with no keeper refuses to start from random weights; with the keeper serving the
    imported step 0, two peers restore it over P2P, the stage-0 peer trains on local text and
    its loss falls, the keeper signs a later step, and its export loads back in transformers."""
    from conftest import TEST_TRAINING, TrackedCluster, assert_all_gone

    hf = make_hf(tmp_path / "hf")
    key, pub = keygen(tmp_path)
    spec_path = tmp_path / "spec.toml"
    assert invoke("spec", "init", spec_path, "--from-hf", hf, "--run-id", "ft", "--trusted-key", pub).exit_code == 0
    spec = load_spec(spec_path)  # test timings: an averaged update every 32 samples
    spec = spec.model_copy(update={"training": spec.training.model_copy(update=dict(TEST_TRAINING, seq_len=32))})
    spec.save(spec_path)
    imported = tmp_path / "keeper-ckpts"
    r = invoke("checkpoint", "import", hf, "--spec", spec_path, "--signing-key", key, "--out", imported)
    assert r.exit_code == 0, r.output
    data = patterned_text(tmp_path / "text")

    cluster = TrackedCluster(tmp_path / "cluster")
    try:
        # Without a keeper nobody serves step 0: a peer refuses to start from random weights.
        lone, lone_addr = cluster.bootstrap("lone", spec_path=spec_path, timeout=120)
        refusing = cluster.peer("refusing", [lone_addr], spec_path=spec_path, stage=0)
        assert refusing.popen.wait(timeout=240) == 1
        assert any("refusing to start from random weights" in line for line in refusing.lines), "".join(
            refusing.lines[-20:]
        )
        cluster.stop(lone)

        keeper = ["--keeper", "--signing-key", str(key), "--checkpoint-dir", str(imported), "--every", "10"]
        boot, addr = cluster.bootstrap(spec_path=spec_path, timeout=120, extra=keeper)
        boot_id = boot.wait_event("ready", 10)["peer_id"]
        s1 = cluster.peer("s1", [addr], spec_path=spec_path, stage=1)
        s0 = cluster.peer("s0", [addr], spec_path=spec_path, stage=0, data=str(data), extra=["--data-suffix", ".txt"])
        for k, p in enumerate((s0, s1)):
            restored = p.wait_event("restored", 240)
            assert restored["step"] == 0 and restored["source"] == boot_id and restored["stage"] == k
        first = s0.wait_event("status", 240, lambda e: e.get("loss") is not None)
        later = s0.wait_event(
            "status", 300, lambda e: e.get("loss") is not None and e["microbatches"] >= first["microbatches"] + 60
        )
        assert later["loss"] < first["loss"] - 0.3, (first, later)  # an EMA: it lags the model
        signed = boot.wait_event("checkpoint_signed", 240, lambda e: e["step"] >= 1)
        cluster.track()
    finally:
        cluster.close()
        assert_all_gone(cluster.seen)

    exported = tmp_path / "exported"
    r = invoke("checkpoint", "export", *signed["paths"], "--spec", spec_path, "--out", exported)
    assert r.exit_code == 0, r.output
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    ids = torch.tensor([[i % 12 + 2 for i in range(32)]])  # w0.. are token ids 2..
    with torch.no_grad():
        trained = model(ids, labels=ids).loss.item()
        original = transformers.LlamaForCausalLM.from_pretrained(hf)(ids, labels=ids).loss.item()
    assert trained < original, (trained, original)
    # The tokenizer travels with the export: the directory is one to generate text with.
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(exported / "tokenizer.json"))
    prompt = tok("w0 w1 w2 w3", return_tensors="pt")["input_ids"]
    assert prompt.tolist() == [[2, 3, 4, 5]]
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 8)
