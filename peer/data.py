"""Local training data: a peer's own files, tokenized and packed into fixed-length sequences.

A peer points at a text file, a directory, JSONL (a ``text`` field per line) or Parquet (a
``text`` column). Documents are streamed lazily, tokenized, joined with the end-of-document
token and cut into sequences of exactly ``seq_len`` tokens. Batches come out forever; every
epoch visits the files in a new order.

Shuffling is two-level, both deterministic in ``(seed, peer_key)``: the file order of each
epoch is a seeded permutation, and the sequences are shuffled in blocks of ``shuffle_buffer``
(each block with its own seeded permutation). Blocks, rather than a reservoir, make the
position cheap to save: a block is rebuilt from the stream position where it started, so the
state is a few integers, not the buffered tokens, and resuming costs at most one block.

Bad input never stops a run: an empty, binary, non-UTF-8 or unreadable file is skipped with
one warning on the ``swarmtrain.data`` logger; only when nothing at all is usable does the
dataset raise :class:`DataError`, naming every file and why it was refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

log = logging.getLogger("swarmtrain.data")

JSON_LINES_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
# Installed third-party packages are not a user's corpus; inside the stdlib directory they
# would make the demo's data depend on whatever happens to be installed on the machine.
SKIPPED_DIR_NAMES = frozenset({"__pycache__", "site-packages", "dist-packages"})
BINARY_SNIFF_BYTES = 8192
# Large text files are read in blocks so that memory stays bounded; blocks end on a newline so
# that a resumed reader, which seeks to a block start, decodes and tokenizes them identically.
TEXT_BLOCK_BYTES = 1 << 20
STATE_VERSION = 1
_MAX_LISTED_REASONS = 20

PathLike = Union[str, Path]


class DataError(ValueError):
    """No usable training data; the message says where and why."""


class _Skip(Exception):
    """A file, or the rest of one, cannot be used; the message says why."""


def discover_files(path: PathLike, suffixes: Optional[Sequence[str]] = None) -> list[Path]:
    """The candidate files under ``path``, in a canonical (sorted) order.

    Hidden entries, ``__pycache__`` and installed-package directories are left out, and each
    real directory is visited once so that a symlink loop cannot trap the walk. ``suffixes``
    (e.g. ``(".py",)``) keeps only files whose names end that way.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None

    def accepted(name: str) -> bool:
        return wanted is None or name.lower().endswith(wanted)

    if root.is_file():
        if not accepted(root.name):
            raise DataError(f"data file {root} does not end with {' or '.join(wanted)}")
        return [root]
    if not root.is_dir():
        raise DataError(f"data path {root} is neither a file nor a directory")

    def unlistable(err: OSError) -> None:
        log.warning("skipping directory %s: %s", err.filename, err.strerror or err)

    files: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlistable):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIR_NAMES]
        for name in filenames:
            if not name.startswith(".") and accepted(name):
                candidate = Path(dirpath, name)
                if candidate.is_file():  # drops broken symlinks, sockets, fifos
                    files.append(candidate)
    if not files:
        what = f"{' or '.join(wanted)} files" if wanted else "files"
        raise DataError(f"data directory {root} holds no {what}")
    files.sort(key=lambda p: p.relative_to(root).parts)
    return files


def stdlib_text_path() -> Path:
    """The running Python's standard library: a corpus every machine has, for the demo."""
    return Path(sysconfig.get_paths()["stdlib"])


# --- readers -------------------------------------------------------------------------------
# Each reader yields (cursor, text, ends_document) from a cursor that a previous reader
# yielded (None: the start of the file). A cursor is JSON-serialisable so that it can go into
# the dataset's state; the reader must yield the piece at that cursor first.


def _read_text(path: Path, cursor: Optional[int], warn) -> Iterator[tuple[Any, str, bool]]:
    offset = cursor or 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if offset == 0:
            head = f.read(BINARY_SNIFF_BYTES)
            if not head:
                raise _Skip("empty file")
            if b"\0" in head:
                raise _Skip("binary file (NUL bytes in the first 8 KiB)")
        while offset < size:
            f.seek(offset)
            data = f.read(min(TEXT_BLOCK_BYTES, size - offset))
            if not data:  # truncated while we read it
                return
            if offset + len(data) < size:
                data = data[: _block_cut(data)]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _Skip(f"not valid UTF-8 (byte {offset + err.start})") from None
            end = offset + len(data)
            if offset == 0:
                text = text.removeprefix("\ufeff")
                if end >= size and not text.strip():
                    raise _Skip("empty file (only whitespace)")
            yield offset, text, end >= size
            offset = end


def _block_cut(data: bytes) -> int:
    """Where to end a text block: after its last newline, else before its last character."""
    cut = data.rfind(b"\n") + 1
    if cut:
        return cut
    cut = len(data)
    while cut > 0 and len(data) - cut < 4 and data[cut - 1] & 0xC0 == 0x80:
        cut -= 1  # continuation bytes of a character that may be incomplete
    if cut > 0 and data[cut - 1] >= 0xC0:
        cut -= 1  # its lead byte
    return cut or len(data)  # not UTF-8 anyway: let the decoder say so


def _read_json_lines(path: Path, cursor: Optional[list], warn) -> Iterator[tuple[Any, str, bool]]:
    offset, line_no = cursor or (0, 0)
    bad, first_bad, good = 0, 0, False
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            start, offset, line_no = offset, offset + len(raw), line_no + 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
                record = None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                bad += 1
                first_bad = first_bad or line_no
                continue
            good = True
            if text.strip():
                yield [start, line_no - 1], text, True
    why = f"{bad} line(s) are not JSON objects with a string 'text' field (first: line {first_bad})"
    if bad and not good:
        raise _Skip(why)
    if bad:
        warn(f"{path}: {why}; they were skipped", path)


def _read_parquet(path: Path, cursor: Optional[list], warn) -> Iterator[tuple[Any, str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first_group, first_row = cursor or (0, 0)
    with open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise _Skip(f"not a readable Parquet file ({err})") from None
        schema = parquet.schema_arrow
        if "text" not in schema.names:
            raise _Skip(f"no 'text' column (columns: {', '.join(schema.names) or 'none'})")
        text_type = schema.field("text").type
        is_string_view = getattr(pa.types, "is_string_view", lambda _: False)
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or is_string_view(text_type)):
            raise _Skip(f"the 'text' column holds {text_type}, not strings")
        for group in range(first_group, parquet.num_row_groups):
            try:
                column = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise _Skip(f"cannot read row group {group} ({err})") from None
            for row in range(first_row if group == first_group else 0, len(column)):
                text = column[row]
                if text and text.strip():
                    yield [group, row], text, True


def _reader_for(path: Path):
    name = path.name.lower()
    if name.endswith(JSON_LINES_SUFFIXES):
        return _read_json_lines
    if name.endswith(PARQUET_SUFFIXES):
        return _read_parquet
    return _read_text


# --- packing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Position:
    """A point in the token stream: a piece of a file, and how many of its tokens were used."""

    epoch: int = 0
    file: int = 0  # index into the epoch's file order
    cursor: Any = None  # the reader's cursor of the piece; None: the start of the file
    token: int = 0


def _derive_seed(*parts: Any) -> int:
    # hashlib, not hash(): the same on every machine and Python process.
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class PackedDataset:
    """Batches ``LongTensor[batch_size, seq_len]`` of packed, shuffled local text, forever.

    Iterate it (``next(dataset)``); ``state_dict()`` / ``load_state_dict()`` save and restore
    the position exactly.
    """

    def __init__(
        self,
        path: PathLike,
        tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        peer_key: str = "",
        shuffle_buffer: int = 256,
        suffixes: Optional[Sequence[str]] = None,
    ):
        if seq_len < 1 or batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("seq_len, batch_size and shuffle_buffer must be positive")
        self.root = Path(path).expanduser()
        self.files = discover_files(self.root, suffixes)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size, self.shuffle_buffer = seq_len, batch_size, shuffle_buffer
        self.seed, self.peer_key = seed, peer_key
        self.skipped: dict[str, str] = {}  # file -> why it gave no text, for DataError and UIs
        self._warned: set[tuple[str, str]] = set()
        self._order_cache: tuple[int, list[int]] = (-1, [])
        self.batches_drawn = 0
        # The position: block number, where the block starts, rows already handed out.
        self._block_idx, self._block_start, self._emitted = 0, _Position(), 0
        self._block: Optional[torch.Tensor] = None  # None: rebuild from _block_start
        self._block_end = _Position()
        # The live stream, kept between blocks so that continuous reading never re-reads.
        self._stream: Optional[Iterator[tuple[_Position, list[int]]]] = None
        self._piece_pos, self._piece, self._used = _Position(), [], 0

    def __repr__(self) -> str:
        return (
            f"PackedDataset({str(self.root)!r}, {len(self.files)} files, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed}, peer_key={self.peer_key!r})"
        )

    def __iter__(self) -> "PackedDataset":
        return self

    def __next__(self) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            if self._block is None:
                self._block, self._block_end = self._build_block(self._block_idx, self._block_start)
            if self._emitted == len(self._block):
                self._block_idx, self._block_start, self._emitted = self._block_idx + 1, self._block_end, 0
                self._block = None
                continue
            take = min(need, len(self._block) - self._emitted)
            rows.append(self._block[self._emitted : self._emitted + take])
            self._emitted += take
            need -= take
        self.batches_drawn += 1
        # cat copies: a view would pin the whole block in memory for as long as the batch lives.
        return torch.cat(rows)

    @property
    def epoch(self) -> int:
        """The epoch the next batch's rows (mostly) come from."""
        return self._block_start.epoch

    # --- position ---

    def state_dict(self) -> dict:
        """A small JSON-serialisable position; loading it into a fresh dataset resumes exactly."""
        block_idx, start, emitted = self._block_idx, self._block_start, self._emitted
        if self._block is not None and emitted == len(self._block):
            block_idx, start, emitted = block_idx + 1, self._block_end, 0  # spare a rebuild
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "peer_key": self.peer_key,
            "seq_len": self.seq_len,
            "shuffle_buffer": self.shuffle_buffer,
            "files_digest": self._files_digest(),
            "epoch": start.epoch,
            "block": block_idx,
            "block_start": asdict(start),
            "emitted": emitted,
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key in ("seed", "peer_key", "seq_len", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data state was saved with {key}={state[key]!r} but this dataset has "
                    f"{key}={getattr(self, key)!r}: the saved position would not reproduce"
                )
        start = _Position(**state["block_start"])
        emitted = int(state["emitted"])
        if state["files_digest"] != self._files_digest():
            log.warning(
                "the files under %s changed since the data position was saved; "
                "restarting epoch %d from its first file",
                self.root, start.epoch,
            )
            start, emitted = _Position(epoch=start.epoch), 0
        self._block_idx, self._block_start, self._emitted = int(state["block"]), start, emitted
        self.batches_drawn = int(state.get("batches_drawn", 0))
        self._block, self._stream = None, None

    def _files_digest(self) -> str:
        names = "\n".join(p.relative_to(self.root).as_posix() if p != self.root else p.name for p in self.files)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    # --- blocks ---

    def _build_block(self, block_idx: int, start: _Position) -> tuple[torch.Tensor, _Position]:
        tokens = self._take(start, self.shuffle_buffer * self.seq_len)
        order = list(range(self.shuffle_buffer))
        random.Random(_derive_seed(self.seed, self.peer_key, "block", block_idx)).shuffle(order)
        block = torch.tensor(tokens, dtype=torch.long).view(self.shuffle_buffer, self.seq_len)
        return block[torch.tensor(order)], replace(self._piece_pos, token=self._used)

    def _take(self, start: _Position, n: int) -> list[int]:
        """``n`` tokens of the stream from ``start``, reusing the live stream when it is there."""
        if self._stream is None or replace(self._piece_pos, token=self._used) != start:
            self._stream = self._pieces(start)
            self._next_piece()
            here = (self._piece_pos.epoch, self._piece_pos.file, self._piece_pos.cursor)
            if here == (start.epoch, start.file, start.cursor):
                self._used = min(start.token, len(self._piece))
        out: list[int] = []
        while len(out) < n:
            if self._used == len(self._piece):
                self._next_piece()
            k = min(n - len(out), len(self._piece) - self._used)
            out.extend(self._piece[self._used : self._used + k])
            self._used += k
        return out

    def _next_piece(self) -> None:
        try:
            self._piece_pos, self._piece = next(self._stream)
        except DataError:
            self._stream = None  # a finished generator would raise StopIteration next time
            raise
        self._used = 0

    def _pieces(self, start: _Position) -> Iterator[tuple[_Position, list[int]]]:
        """Tokenized pieces of the files, epoch after epoch, from ``start`` onwards."""
        eos = self.tokenizer.eos_id
        epoch, index, cursor = start.epoch, start.file, start.cursor
        # Files that gave no tokens since the last that did: once that is all of them, there is
        # no data (counting files, not visits: a reshuffle can put a bad file twice in a row).
        barren: set[int] = set()
        while True:
            order = self._file_order(epoch)
            while index < len(order):
                path = self.files[order[index]]
                produced, reason = False, None
                try:
                    for piece_cursor, text, ends_doc in _reader_for(path)(path, cursor, self._warn):
                        tokens = self.tokenizer.encode(text)
                        if ends_doc and eos is not None:
                            tokens.append(eos)
                        if tokens:
                            produced = True
                            yield _Position(epoch, index, piece_cursor, 0), tokens
                    if not produced:
                        reason = "no text"
                except _Skip as why:
                    reason = str(why)
                except OSError as err:
                    reason = f"unreadable ({err.strerror or err})"
                if reason and produced:
                    self._warn(f"{path}: {reason}; the rest of the file is skipped", path)
                elif reason:
                    self.skipped[str(path)] = reason
                    self._warn(f"skipping {path}: {reason}", path)
                if produced:
                    barren.clear()
                else:
                    barren.add(order[index])
                if len(barren) == len(self.files):
                    raise DataError(self._nothing_usable())
                index, cursor = index + 1, None
            epoch, index = epoch + 1, 0

    def _file_order(self, epoch: int) -> list[int]:
        if self._order_cache[0] != epoch:
            order = list(range(len(self.files)))
            random.Random(_derive_seed(self.seed, self.peer_key, "files", epoch)).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _warn(self, message: str, path: Path) -> None:
        # Once per file and message: small data sets loop over the same files every epoch.
        if (str(path), message) not in self._warned:
            self._warned.add((str(path), message))
            log.warning("%s", message)

    def _nothing_usable(self) -> str:
        reasons = [f"  {path}: {why}" for path, why in self.skipped.items()]
        if len(reasons) > _MAX_LISTED_REASONS:
            more = len(reasons) - _MAX_LISTED_REASONS
            reasons = reasons[:_MAX_LISTED_REASONS] + [f"  ... and {more} more"]
        return f"no usable text under {self.root}: every file was skipped\n" + "\n".join(reasons)


def fixed_batch(
    dataset_path: PathLike,
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 1234,
    suffixes: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """A deterministic evaluation batch: the same tokens for the same files, on every peer."""
    dataset = PackedDataset(
        dataset_path, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
        peer_key="eval", suffixes=suffixes,
    )
    return next(dataset)
