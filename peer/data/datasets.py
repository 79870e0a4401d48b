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
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from peer.data.files import MAX_LISTED_REASONS, DataError, PathLike, Skip, discover_files, reader_for

log = logging.getLogger("swarmtrain.data")

STATE_VERSION = 1


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
                "the files under %s changed since the data position was saved; restarting epoch %d from its first file",
                self.root,
                start.epoch,
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
                    for piece_cursor, text, ends_doc in reader_for(path)(path, cursor, self._warn):
                        tokens = self.tokenizer.encode(text)
                        if ends_doc and eos is not None:
                            tokens.append(eos)
                        if tokens:
                            produced = True
                            yield _Position(epoch, index, piece_cursor, 0), tokens
                    if not produced:
                        reason = "no text"
                except Skip as why:
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
        if len(reasons) > MAX_LISTED_REASONS:
            more = len(reasons) - MAX_LISTED_REASONS
            reasons = reasons[:MAX_LISTED_REASONS] + [f"  ... and {more} more"]
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
        dataset_path,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        peer_key="eval",
        suffixes=suffixes,
    )
    return next(dataset)
