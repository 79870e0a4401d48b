import builtins
import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import peer.data.files as data_module
from peer.data import DataError, PackedDataset, discover_files, fixed_batch, stdlib_text_path
from peer.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_id


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_parquet(path, table, row_group_size=None):
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return path


def stream_of(ds, batches):
    """The rows of ``batches`` batches, in order, as one token list."""
    return torch.cat([next(ds).flatten() for _ in range(batches)]).tolist()


def decoded(ds, batches):
    return TOK.decode(stream_of(ds, batches))


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="swarmtrain.data")
    return caplog


def make_mixed_dir(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text file\n")
    (root / "sub" / "b.md").write_text("# bravo markdown\n")
    write_jsonl(root / "c.jsonl", [{"text": "charlie one"}, {"text": "charlie two", "id": 2}])
    write_parquet(root / "sub" / "d.parquet", {"text": ["delta one", "delta two"]})
    for hidden in (".git", "__pycache__", "site-packages"):
        (root / hidden).mkdir()
        (root / hidden / "x.txt").write_text("HIDDEN")
    (root / ".hidden.txt").write_text("HIDDEN")
    return root


# --- formats ---


def test_text_file_packs_exactly(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world")
    # shuffle_buffer=1 leaves the stream in order: the file, eos, the file again (next epoch).
    ds = PackedDataset(path, TOK, seq_len=5, batch_size=3, seed=0, shuffle_buffer=1)
    doc = TOK.encode("hello world") + [EOS]
    assert stream_of(ds, 4) == (doc * 6)[:60]


def test_batch_shape_dtype_and_vocab(tmp_path):
    ds = PackedDataset(make_mixed_dir(tmp_path / "d"), TOK, seq_len=32, batch_size=4, seed=0)
    for _ in range(5):
        batch = next(ds)
        assert batch.shape == (4, 32) and batch.dtype == torch.long
        assert 0 <= int(batch.min()) and int(batch.max()) < TOK.vocab_size


def test_directory_of_mixed_files(tmp_path):
    root = make_mixed_dir(tmp_path / "d")
    files = discover_files(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a.txt", "c.jsonl", "sub/b.md", "sub/d.parquet"]
    ds = PackedDataset(root, TOK, seq_len=16, batch_size=4, seed=3, shuffle_buffer=2)
    text = decoded(ds, 20)
    for word in ("alpha text file", "bravo markdown", "charlie one", "charlie two", "delta one", "delta two"):
        assert word in text
    assert "HIDDEN" not in text and '"text"' not in text


def test_jsonl_documents_end_with_eos(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": ""}, "", {"text": "two"}])
    ds = PackedDataset(path, TOK, seq_len=4, batch_size=2, seed=0, shuffle_buffer=1)
    expected = TOK.encode("one") + [EOS] + TOK.encode("two") + [EOS]
    assert stream_of(ds, 1) == expected


def test_json_suffix_is_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.json", [{"text": "abc"}])
    ds = PackedDataset(path, TOK, seq_len=4, batch_size=1, seed=0, shuffle_buffer=1)
    assert stream_of(ds, 1) == TOK.encode("abc") + [EOS]


def test_parquet_row_groups_and_nulls(tmp_path):
    path = write_parquet(
        tmp_path / "a.parquet", {"text": ["ab", None, "cd", "ef"], "n": [1, 2, 3, 4]}, row_group_size=2
    )
    assert pq.ParquetFile(path).num_row_groups == 2
    ds = PackedDataset(path, TOK, seq_len=3, batch_size=3, seed=0, shuffle_buffer=1)
    doc = TOK.encode("ab") + [EOS] + TOK.encode("cd") + [EOS] + TOK.encode("ef") + [EOS]
    assert stream_of(ds, 1) == doc


def test_large_text_file_is_read_in_blocks(tmp_path, monkeypatch):
    # Tiny blocks and lines longer than a block: cuts fall inside multi-byte characters.
    monkeypatch.setattr(data_module, "TEXT_BLOCK_BYTES", 7)
    text = "日本語のテキスト é è ü\nshort\n" + "ab" * 20 + "\nend"
    path = tmp_path / "big.txt"
    path.write_text(text)
    ds = PackedDataset(path, TOK, seq_len=8, batch_size=1, seed=0, shuffle_buffer=1)
    doc = TOK.encode(text) + [EOS]
    assert stream_of(ds, 2 * len(doc) // 8) == (doc * 2)[: 2 * len(doc) // 8 * 8]


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhi")
    ds = PackedDataset(path, TOK, seq_len=3, batch_size=1, seed=0, shuffle_buffer=1)
    assert stream_of(ds, 1) == [ord("h"), ord("i"), EOS]


# --- discovery ---


def test_discover_single_file_and_suffix_filter(tmp_path):
    (tmp_path / "a.py").write_text("x = 1")
    (tmp_path / "b.txt").write_text("b")
    assert discover_files(tmp_path / "a.py") == [tmp_path / "a.py"]
    assert discover_files(tmp_path, suffixes=(".py",)) == [tmp_path / "a.py"]
    with pytest.raises(DataError, match=r"no \.rs files"):
        discover_files(tmp_path, suffixes=(".rs",))
    with pytest.raises(DataError, match=r"does not end with \.py"):
        discover_files(tmp_path / "b.txt", suffixes=(".py",))


def test_discover_survives_symlink_loop(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    os.symlink(tmp_path / "missing", tmp_path / "d" / "broken.txt")
    assert discover_files(tmp_path) == [tmp_path / "d" / "a.txt"]


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PackedDataset(tmp_path / "nope", TOK, seq_len=8, batch_size=1, seed=0)


def test_empty_directory(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    with pytest.raises(DataError, match="holds no files"):
        discover_files(tmp_path)


# --- bad input ---


def make_unreadable(path, monkeypatch):
    """chmod 000, or, as root (where chmod blocks nothing), an open() that refuses the file."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)


def test_bad_text_files_are_skipped_with_one_warning(tmp_path, monkeypatch, warnings_log):
    (tmp_path / "good.txt").write_text("good text")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "locked.txt").write_text("secret")
    make_unreadable(tmp_path / "locked.txt", monkeypatch)

    ds = PackedDataset(tmp_path, TOK, seq_len=8, batch_size=4, seed=0, shuffle_buffer=4)
    text = decoded(ds, 30)  # many epochs
    assert "good text" in text and "secret" not in text
    assert ds.skipped == {
        str(tmp_path / "empty.txt"): "empty file",
        str(tmp_path / "blank.txt"): "empty file (only whitespace)",
        str(tmp_path / "binary.bin"): "binary file (NUL bytes in the first 8 KiB)",
        str(tmp_path / "latin1.txt"): "not valid UTF-8 (byte 3)",
        str(tmp_path / "locked.txt"): "unreadable (Permission denied)",
    }
    messages = [r.getMessage() for r in warnings_log.records if r.name == "swarmtrain.data"]
    assert len(messages) == 5  # once per file, not once per epoch
    for name, why in [
        ("empty.txt", "empty"),
        ("binary.bin", "binary"),
        ("latin1.txt", "UTF-8"),
        ("locked.txt", "Permission denied"),
    ]:
        assert any(name in m and why in m for m in messages), (name, messages)


def test_invalid_utf8_late_in_a_large_file(tmp_path, monkeypatch, warnings_log):
    monkeypatch.setattr(data_module, "TEXT_BLOCK_BYTES", 8)
    path = tmp_path / "a.txt"
    path.write_bytes(b"line one\nline two\n\xff\xff\xff bad\n")
    ds = PackedDataset(path, TOK, seq_len=9, batch_size=2, seed=0, shuffle_buffer=1)
    # No eos: the document was cut short. The next epoch reads the good part again.
    assert TOK.decode(stream_of(ds, 2)) == "line one\nline two\n" * 2
    assert any("rest of the file is skipped" in r.getMessage() for r in warnings_log.records)


def test_jsonl_bad_lines_warn_once_with_count(tmp_path, warnings_log):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": "good one"},
            "{not json",
            {"title": "no text field"},
            {"text": 42},
            "[1, 2]",
            {"text": "good two"},
        ],
    )
    with open(path, "ab") as f:
        f.write(b"\xff\xfe\n")
    ds = PackedDataset(path, TOK, seq_len=8, batch_size=4, seed=0, shuffle_buffer=2)
    text = decoded(ds, 10)
    assert "good one" in text and "good two" in text and "no text field" not in text
    messages = [r.getMessage() for r in warnings_log.records]
    assert len(messages) == 1, messages
    assert str(path) in messages[0] and "5 line(s)" in messages[0] and "line 2" in messages[0]


def test_jsonl_without_any_good_line_is_skipped(tmp_path, warnings_log):
    (tmp_path / "good.txt").write_text("fine")
    write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}, {"body": "y"}])
    ds = PackedDataset(tmp_path, TOK, seq_len=4, batch_size=2, seed=0, shuffle_buffer=2)
    next(ds)
    assert "not JSON objects with a string 'text' field" in ds.skipped[str(tmp_path / "bad.jsonl")]


def test_parquet_without_text_column_or_unreadable(tmp_path, warnings_log):
    (tmp_path / "good.txt").write_text("fine")
    write_parquet(tmp_path / "notext.parquet", {"body": ["x"], "id": [1]})
    write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    ds = PackedDataset(tmp_path, TOK, seq_len=4, batch_size=2, seed=0, shuffle_buffer=2)
    next(ds)
    assert ds.skipped[str(tmp_path / "notext.parquet")] == "no 'text' column (columns: body, id)"
    assert "not strings" in ds.skipped[str(tmp_path / "ints.parquet")]
    assert "not a readable Parquet file" in ds.skipped[str(tmp_path / "broken.parquet")]
    assert len(warnings_log.records) == 3


def test_all_files_bad_raises_with_reasons(tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.dat").write_bytes(b"\x00\x01\x02")
    write_parquet(tmp_path / "notext.parquet", {"body": ["x"]})
    write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    (tmp_path / "locked.txt").write_text("secret")
    make_unreadable(tmp_path / "locked.txt", monkeypatch)
    ds = PackedDataset(tmp_path, TOK, seq_len=4, batch_size=1, seed=0)
    with pytest.raises(DataError) as err:
        next(ds)
    message = str(err.value)
    for name, why in [
        ("empty.txt", "empty"),
        ("binary.dat", "binary"),
        ("notext.parquet", "no 'text' column"),
        ("bad.jsonl", "line 1"),
        ("locked.txt", "Permission denied"),
    ]:
        assert f"{tmp_path / name}: " in message and why in message, (name, message)
    with pytest.raises(DataError):  # and again, rather than a StopIteration
        next(ds)


# --- determinism and resumption ---


def make_corpus(root, files=12):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (i + 1) + "\n")
    write_jsonl(root / "lines.jsonl", [{"text": f"json record {i} " * 3} for i in range(9)])
    write_parquet(root / "table.parquet", {"text": [f"parquet row {i} " * 4 for i in range(10)]}, row_group_size=3)
    return root


def batches(ds, n):
    return [next(ds) for _ in range(n)]


def test_same_peer_key_reproduces_and_others_differ(tmp_path):
    root = make_corpus(tmp_path / "c")
    kw = dict(seq_len=16, batch_size=4, shuffle_buffer=8)
    a = batches(PackedDataset(root, TOK, seed=1, peer_key="peer-a", **kw), 12)
    again = batches(PackedDataset(root, TOK, seed=1, peer_key="peer-a", **kw), 12)
    other_peer = batches(PackedDataset(root, TOK, seed=1, peer_key="peer-b", **kw), 12)
    other_seed = batches(PackedDataset(root, TOK, seed=2, peer_key="peer-a", **kw), 12)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not torch.equal(torch.stack(a), torch.stack(other_peer))
    assert not torch.equal(torch.stack(a), torch.stack(other_seed))


def test_epochs_change_file_order(tmp_path):
    root = make_corpus(tmp_path / "c")
    ds = PackedDataset(root, TOK, seq_len=16, batch_size=4, seed=0, peer_key="p")
    orders = [ds._file_order(epoch) for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(len(ds.files)))


def test_epochs_advance(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 50)
    ds = PackedDataset(tmp_path, TOK, seq_len=10, batch_size=2, seed=0, shuffle_buffer=4)
    batches(ds, 20)
    assert ds.epoch > 5 and ds.state_dict()["epoch"] == ds.epoch


@pytest.mark.parametrize("drawn", [0, 1, 3, 7, 8, 13])
def test_resume_yields_the_same_batches(tmp_path, monkeypatch, drawn):
    # Small text blocks put saved positions inside text files, JSONL lines and Parquet row groups;
    # batch_size 3 with shuffle_buffer 8 makes batches straddle shuffle blocks.
    monkeypatch.setattr(data_module, "TEXT_BLOCK_BYTES", 64)
    root = make_corpus(tmp_path / "c", files=6)
    kw = dict(seq_len=16, batch_size=3, seed=5, peer_key="peer-a", shuffle_buffer=8)
    original = PackedDataset(root, TOK, **kw)
    batches(original, drawn)
    state = json.loads(json.dumps(original.state_dict()))
    assert len(json.dumps(state)) < 1000
    expected = batches(original, 25)  # several epochs of this small corpus

    resumed = PackedDataset(root, TOK, **kw)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(batches(resumed, 25), expected))
    assert resumed.batches_drawn == original.batches_drawn


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_resume_inside_each_format(tmp_path, monkeypatch, fmt):
    # Saved positions land inside one file of each format: text blocks, JSONL lines, row groups.
    monkeypatch.setattr(data_module, "TEXT_BLOCK_BYTES", 24)
    docs = [f"doc {i} " + "word " * (i % 5 + 1) for i in range(15)]
    if fmt == "txt":
        (tmp_path / "a.txt").write_text("\n".join(docs))
    elif fmt == "jsonl":
        write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    else:
        write_parquet(tmp_path / "a.parquet", {"text": docs}, row_group_size=4)
    kw = dict(seq_len=8, batch_size=2, seed=0, shuffle_buffer=3)
    reference = batches(PackedDataset(tmp_path, TOK, **kw), 40)
    for drawn in range(0, 20, 3):
        original = PackedDataset(tmp_path, TOK, **kw)
        batches(original, drawn)
        resumed = PackedDataset(tmp_path, TOK, **kw)
        resumed.load_state_dict(json.loads(json.dumps(original.state_dict())))
        assert all(torch.equal(x, y) for x, y in zip(batches(resumed, 20), reference[drawn:])), drawn


def test_resume_twice_in_a_row(tmp_path):
    root = make_corpus(tmp_path / "c")
    kw = dict(seq_len=32, batch_size=4, seed=0, shuffle_buffer=16)
    reference = batches(PackedDataset(root, TOK, **kw), 30)
    ds = PackedDataset(root, TOK, **kw)
    got = batches(ds, 10)
    for _ in range(2):
        state = ds.state_dict()
        ds = PackedDataset(root, TOK, **kw)
        ds.load_state_dict(state)
        got += batches(ds, 10)
    assert all(torch.equal(x, y) for x, y in zip(got, reference))


def test_state_from_another_peer_is_refused(tmp_path):
    root = make_corpus(tmp_path / "c")
    state = PackedDataset(root, TOK, seq_len=16, batch_size=2, seed=0, peer_key="a").state_dict()
    with pytest.raises(DataError, match="peer_key"):
        PackedDataset(root, TOK, seq_len=16, batch_size=2, seed=0, peer_key="b").load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        PackedDataset(root, TOK, seq_len=8, batch_size=2, seed=0, peer_key="a").load_state_dict(state)


def test_changed_files_restart_the_epoch_with_a_warning(tmp_path, warnings_log):
    root = make_corpus(tmp_path / "c")
    ds = PackedDataset(root, TOK, seq_len=16, batch_size=2, seed=0)
    batches(ds, 30)
    state = ds.state_dict()
    (root / "new.txt").write_text("a new file")
    fresh = PackedDataset(root, TOK, seq_len=16, batch_size=2, seed=0)
    fresh.load_state_dict(state)
    assert next(fresh).shape == (2, 16)
    assert any("changed" in r.getMessage() for r in warnings_log.records)


# --- helpers for the demo and evaluation ---


def test_stdlib_yields_a_batch_quickly():
    path = stdlib_text_path()
    assert (path / "os.py").is_file()
    start = time.monotonic()
    ds = PackedDataset(path, TOK, seq_len=256, batch_size=8, seed=0, suffixes=(".py",))
    batch = next(ds)
    elapsed = time.monotonic() - start
    assert batch.shape == (8, 256)
    assert elapsed < 5, elapsed  # ~0.2 s here; generous for a loaded CI machine
    assert len(ds.files) > 500 and all(p.suffix == ".py" for p in ds.files)
    assert not any("site-packages" in p.parts or "__pycache__" in p.parts for p in ds.files)


def test_fixed_batch_is_deterministic(tmp_path):
    root = make_corpus(tmp_path / "c")
    a = fixed_batch(root, TOK, seq_len=16, batch_size=4)
    b = fixed_batch(root, TOK, seq_len=16, batch_size=4)
    c = fixed_batch(root, TOK, seq_len=16, batch_size=4, seed=99)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
