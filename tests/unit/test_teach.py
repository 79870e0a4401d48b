"""Teacher peers, the parts: soft targets on the wire (and the hostile-input rules that decode
them), the distillation loss, the spot-check verdicts, a teacher model's checks against the
run's spec. The ``swarmtrain.teach`` RPC between real P2P daemons is in
tests/integration/test_teach_net.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from peer.model.distill import combined_loss, distill_kl
from peer.model.hf_io import export_hf_dir
from peer.model.llama import LlamaStage, causal_lm_loss
from peer.teach.model import TeacherError, TeacherModel
from peer.teach.trust import AGREE_DISTANCE, distance, verdict
from protocol import soft_targets
from protocol.codecs import TensorRejected
from protocol.spec import preset_spec
from protocol.weights import weights_digest

from teach_helpers import distill_spec

pytestmark = pytest.mark.timeout(300)


def top(logits, k):
    values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return ids, values


# --- soft targets on the wire ------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [257, 32000, 128256])
def test_soft_targets_round_trip_in_a_few_bytes_a_token(vocab):
    ids, lp = top(torch.randn(2, 16, vocab), 8)
    data = soft_targets.encode(ids, lp, vocab)
    assert len(data) == soft_targets.encoded_size(2, 16, 8, vocab)
    got_ids, got_lp = soft_targets.decode(data, batch=2, length=16, k=8, vocab_size=vocab)
    assert torch.equal(got_ids, ids)
    torch.testing.assert_close(got_lp, lp, atol=5e-3, rtol=2e-3)
    assert len(data) / (2 * 16) <= 33  # 8 indices of at most 17 bits and 8 float16 values


def _tampered(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def test_soft_targets_from_the_wire_are_checked_before_use():
    vocab, shape = 257, dict(batch=1, length=4, k=4, vocab_size=257)
    ids, lp = top(torch.randn(1, 4, vocab), 4)
    good = soft_targets.encode(ids, lp, vocab)
    index_bytes = (16 * 9 + 7) // 8
    with pytest.raises(TensorRejected, match="bytes where"):
        soft_targets.decode(good + b"\0", **shape)
    with pytest.raises(TensorRejected, match="bytes where"):
        soft_targets.decode(good[:-2], **shape)
    with pytest.raises(TensorRejected, match="token ids must be in"):  # 511 > 256: all index bits set
        soft_targets.decode(_tampered(good, 0, b"\xff\xff"), **shape)
    same = torch.zeros_like(ids)
    with pytest.raises(TensorRejected, match="appears twice"):
        soft_targets.decode(soft_targets.encode(same, lp, vocab), **shape)
    nan = torch.tensor([float("nan")], dtype=torch.float16).numpy().tobytes()
    with pytest.raises(TensorRejected, match="finite"):
        soft_targets.decode(_tampered(good, index_bytes, nan), **shape)
    positive = torch.tensor([0.5], dtype=torch.float16).numpy().tobytes()
    with pytest.raises(TensorRejected, match="at most 0"):
        soft_targets.decode(_tampered(good, index_bytes, positive), **shape)
    half = torch.full((1, 4, 4), -0.5)  # four tokens of probability 0.61 each
    with pytest.raises(TensorRejected, match="sum to more than 1"):
        soft_targets.decode(soft_targets.encode(ids, half, vocab), **shape)


# --- the loss ----------------------------------------------------------------------------------


def test_distillation_term_is_the_kl_over_top_k_and_the_rest():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    full = F.kl_div(
        F.log_softmax(logits[:, :-1], -1), F.log_softmax(teacher[:, :-1], -1), log_target=True, reduction="none"
    )
    ids, lp = top(teacher, 11)  # every token in the top k: the plain KL
    torch.testing.assert_close(distill_kl(logits, ids, lp, 1.0), full.sum(-1).mean())
    ids, lp = top(teacher, 3)
    assert float(distill_kl(teacher, ids, lp, 1.0)) == pytest.approx(0.0, abs=1e-6)  # the teacher itself
    # by hand: three buckets and the rest, at one position
    s, t = F.log_softmax(logits[0, 0], -1), F.log_softmax(teacher[0, 0], -1)
    p, q = t[ids[0, 0]].exp(), s[ids[0, 0]].exp()
    by_hand = (p * (p.log() - q.log())).sum() + (1 - p.sum()) * ((1 - p.sum()).log() - (1 - q.sum()).log())
    one = distill_kl(logits[:1, :2], ids[:1, :2], lp[:1, :2], 1.0)
    torch.testing.assert_close(one, by_hand)


def test_combined_loss_weighs_labels_and_teacher():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    ids, lp = top(torch.randn(2, 6, 11) * 3, 4)
    ce = causal_lm_loss(logits, labels)
    loss, label = combined_loss(logits, labels, None, weight=0.7, temperature=2.0)
    assert float(loss) == float(label) == float(ce)
    loss, label = combined_loss(logits, labels, (ids, lp), weight=0.7, temperature=2.0)
    expected = 0.3 * ce + 0.7 * distill_kl(logits, ids, lp, 2.0)
    torch.testing.assert_close(loss, expected)
    assert float(label) == float(ce)
    kl = distill_kl(logits, ids, lp, 2.0) / 4.0  # the temperature's square scales the term
    student = F.log_softmax(logits[:, :-1] / 2.0, -1)
    assert float(kl) > 0 and torch.isfinite(student).all()


# --- spot checks -------------------------------------------------------------------------------


def test_honest_answers_agree_and_a_liar_is_outvoted():
    torch.manual_seed(2)
    teacher = torch.randn(2, 16, 257) * 3
    honest = top(teacher, 8)
    noisy = top(teacher + torch.randn_like(teacher) * 1e-4, 8)  # another machine's rounding
    assert distance(honest, noisy) < 1e-3
    shifted = ((honest[0] + 1) % 257, honest[1])  # the right probabilities on the wrong tokens
    other_model = top(torch.randn(2, 16, 257) * 3, 8)
    assert distance(honest, shifted) > 0.5 and distance(honest, other_model) > 0.3
    assert distance(honest, honest) == 0.0
    v = verdict({"a": honest, "b": noisy, "liar": shifted})
    assert v.trusted == {"a", "b"} and v.outvoted == {"liar"} and not v.undecided
    v = verdict({"a": honest, "liar": shifted, "other": other_model})
    assert v.undecided == {"a", "liar", "other"} and not v.trusted and not v.outvoted
    assert verdict({"a": honest, "b": noisy}).trusted == {"a", "b"}


# --- the teacher model's checks ----------------------------------------------------------------


def test_a_teacher_loads_and_answers_top_k_of_the_run_vocabulary(teacher_dir):
    spec = distill_spec(k=5, temperature=2.0)
    teacher = TeacherModel.load(teacher_dir, spec)
    assert teacher.digest == weights_digest(teacher_dir)
    ids = torch.randint(0, 257, (2, 9))
    top_ids, lp = teacher.soft_targets(ids)
    assert top_ids.shape == lp.shape == (2, 9, 5)
    assert bool((lp <= 0).all()) and float(lp.exp().sum(-1).max()) <= 1 + 1e-5
    assert teacher.measure(2, 9, passes=1) > 0


def test_honest_teachers_on_other_thread_counts_agree(teacher_dir):
    spec = distill_spec()
    teacher = TeacherModel.load(teacher_dir, spec)
    ids = torch.randint(0, 257, (8, 64), generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = teacher.soft_targets(ids)
        torch.set_num_threads(2)
        two = teacher.soft_targets(ids)
    finally:
        torch.set_num_threads(before)
    wire = [
        soft_targets.decode(soft_targets.encode(*a, 257), batch=8, length=64, k=8, vocab_size=257) for a in (one, two)
    ]
    assert distance(*wire) < AGREE_DISTANCE / 10


def test_a_teacher_that_cannot_teach_the_run_is_refused(teacher_dir, tmp_path):
    with pytest.raises(TeacherError, match="no \\[distill\\] section"):
        TeacherModel.load(teacher_dir, preset_spec("tiny"))
    with pytest.raises(TeacherError, match="not among the teachers"):
        TeacherModel.load(teacher_dir, distill_spec(teacher_digests=["0" * 64]))
    assert TeacherModel.load(teacher_dir, distill_spec(teacher_digests=[weights_digest(teacher_dir)]))
    other = tmp_path / "own-tokenizer"
    other.mkdir()
    for f in teacher_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(TeacherError, match="own tokenizer.json.*byte tokenizer"):
        TeacherModel.load(other, distill_spec())
    (other / "tokenizer.json").unlink()
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(TeacherError, match="200 output tokens, fewer than"):
        TeacherModel.load(other, distill_spec())
    (other / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    with pytest.raises(TeacherError, match="at most 32 positions"):
        TeacherModel.load(other, distill_spec())
    with pytest.raises(TeacherError, match="no readable config.json"):
        TeacherModel.load(tmp_path, distill_spec())


def test_a_run_with_a_tokenizer_file_takes_teachers_of_that_vocabulary(tmp_path):
    """A tokenizer.json run: the same file, or one that maps every token to the same id, passes;
    another vocabulary is refused naming what differs."""
    tokenizers = pytest.importorskip("tokenizers")
    from peer.data.tokenizer import file_sha256

    def tokenizer(path, words):
        model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
        tok = tokenizers.Tokenizer(model)
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tok.save(str(path))
        return path

    words = [f"w{i}" for i in range(40)]
    run_tok = tokenizer(tmp_path / "run-tokenizer.json", words)
    spec = preset_spec(
        "tiny",
        run_id="filetok",
        model=dict(vocab_size=48),
        tokenizer=dict(kind="file", path=str(run_tok), sha256=file_sha256(run_tok)),
        distill=dict(k=4),
    )
    stages = [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]
    hf = tmp_path / "hf"
    export_hf_dir(spec, [s.state_dict() for s in stages], hf)
    with pytest.raises(TeacherError, match="no tokenizer.json"):
        TeacherModel.load(hf, spec)
    (hf / "tokenizer.json").write_bytes(run_tok.read_bytes())
    assert TeacherModel.load(hf, spec).vocab == 48
    tokenizer(hf / "tokenizer.json", words)  # written again: the same ids (the bytes may differ)
    assert TeacherModel.load(hf, spec)
    tokenizer(hf / "tokenizer.json", list(reversed(words)))
    with pytest.raises(TeacherError, match="40 token\\(s\\) differ"):
        TeacherModel.load(hf, spec)
