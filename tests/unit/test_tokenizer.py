import hashlib

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from peer.data import PackedDataset
from peer.data.tokenizer import ByteTokenizer, FileTokenizer, TokenizerError, load_tokenizer
from protocol.spec import BYTE_VOCAB_SIZE, TokenizerSpec

CORPUS = ["the quick brown fox", "jumps over the lazy dog", "the dog sleeps", "a fox runs"]


def make_tokenizer_file(path, specials=("<unk>", "</s>")):
    """A tiny BPE tokenizer.json trained right here: tests never download one."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=60, special_tokens=list(specials)))
    tok.save(str(path))
    return path


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.vocab_size == BYTE_VOCAB_SIZE == 257
    assert tok.eos_id == 256
    ids = tok.encode("héllo, 世界")
    assert all(0 <= i < 256 for i in ids)
    assert ids == list("héllo, 世界".encode())
    assert tok.decode(ids + [tok.eos_id]) == "héllo, 世界"


def test_byte_tokenizer_is_lenient():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # half a character does not raise
    assert tok.encode("\ud800x") == [ord("?"), ord("x")]  # a lone surrogate (legal in JSON)


def test_file_tokenizer(tmp_path):
    tok = FileTokenizer(make_tokenizer_file(tmp_path / "tokenizer.json"))
    assert tok.eos_id == tok._tok.token_to_id("</s>")
    ids = tok.encode("the lazy fox")
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids + [tok.eos_id]) == "the lazy fox"


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<eos>"])
def test_file_tokenizer_other_eos_names(tmp_path, eos):
    tok = FileTokenizer(make_tokenizer_file(tmp_path / "t.json", specials=("<unk>", eos)))
    assert tok.eos_id == tok._tok.token_to_id(eos)


def test_file_tokenizer_without_eos(tmp_path):
    tok = FileTokenizer(make_tokenizer_file(tmp_path / "t.json", specials=("<unk>",)))
    assert tok.eos_id is None


def test_load_bytes():
    assert isinstance(load_tokenizer(TokenizerSpec()), ByteTokenizer)


def test_load_file_relative_to_base_dir(tmp_path):
    path = make_tokenizer_file(tmp_path / "tokenizer.json")
    spec = TokenizerSpec(kind="file", path="tokenizer.json", sha256=sha256(path))
    tok = load_tokenizer(spec, base_dir=tmp_path)
    assert isinstance(tok, FileTokenizer)
    assert tok.encode("the dog") == FileTokenizer(path).encode("the dog")


def test_load_file_absolute(tmp_path):
    path = make_tokenizer_file(tmp_path / "tokenizer.json")
    spec = TokenizerSpec(kind="file", path=str(path), sha256=sha256(path))
    assert isinstance(load_tokenizer(spec, base_dir=tmp_path / "elsewhere"), FileTokenizer)


def test_load_file_digest_mismatch(tmp_path):
    path = make_tokenizer_file(tmp_path / "tokenizer.json")
    wrong = "0" * 64
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(TokenizerSpec(kind="file", path=str(path), sha256=wrong))
    message = str(err.value)
    assert wrong in message and sha256(path) in message and str(path) in message
    assert isinstance(err.value, ValueError)


def test_load_file_missing(tmp_path):
    spec = TokenizerSpec(kind="file", path="nope.json", sha256="a" * 64)
    with pytest.raises(TokenizerError, match="not found") as err:
        load_tokenizer(spec, base_dir=tmp_path)
    assert str(tmp_path / "nope.json") in str(err.value)


def test_load_file_malformed(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(TokenizerSpec(kind="file", path=str(path), sha256=sha256(path)))


def test_packed_dataset_with_file_tokenizer(tmp_path):
    tok = FileTokenizer(make_tokenizer_file(tmp_path / "tokenizer.json"))
    data = tmp_path / "data"
    data.mkdir()
    for i, line in enumerate(CORPUS):
        (data / f"{i}.txt").write_text(line)
    batch = next(PackedDataset(data, tok, seq_len=16, batch_size=4, seed=0, shuffle_buffer=4))
    assert batch.shape == (4, 16)
    assert int(batch.max()) < tok.vocab_size
    assert (batch == tok.eos_id).any()  # documents are separated


def test_packed_dataset_file_tokenizer_without_eos(tmp_path):
    tok = FileTokenizer(make_tokenizer_file(tmp_path / "t.json", specials=("<unk>",)))
    (tmp_path / "a.txt").write_text("the quick brown fox")
    ds = PackedDataset(tmp_path / "a.txt", tok, seq_len=4, batch_size=2, seed=0, shuffle_buffer=1)
    ids = tok.encode("the quick brown fox")
    stream = (ids * 4)[:8]  # documents joined without a separator
    assert next(ds).flatten().tolist() == stream
