"""A peer's text files: which files a data path names, and readers for each format.

Text, JSON lines (a ``text`` field per line) and Parquet (a ``text`` column) are read lazily,
in blocks, each piece with a cursor to resume from. A file that cannot give text raises
``Skip`` with the reason (the dataset warns once and goes on).
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

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
MAX_LISTED_REASONS = 20

PathLike = Union[str, Path]


class DataError(ValueError):
    """No usable training data; the message says where and why."""


class Skip(Exception):
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
                raise Skip("empty file")
            if b"\0" in head:
                raise Skip("binary file (NUL bytes in the first 8 KiB)")
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
                raise Skip(f"not valid UTF-8 (byte {offset + err.start})") from None
            end = offset + len(data)
            if offset == 0:
                text = text.removeprefix("\ufeff")
                if end >= size and not text.strip():
                    raise Skip("empty file (only whitespace)")
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
        raise Skip(why)
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
            raise Skip(f"not a readable Parquet file ({err})") from None
        schema = parquet.schema_arrow
        if "text" not in schema.names:
            raise Skip(f"no 'text' column (columns: {', '.join(schema.names) or 'none'})")
        text_type = schema.field("text").type
        is_string_view = getattr(pa.types, "is_string_view", lambda _: False)
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or is_string_view(text_type)):
            raise Skip(f"the 'text' column holds {text_type}, not strings")
        for group in range(first_group, parquet.num_row_groups):
            try:
                column = parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise Skip(f"cannot read row group {group} ({err})") from None
            for row in range(first_row if group == first_group else 0, len(column)):
                text = column[row]
                if text and text.strip():
                    yield [group, row], text, True


def reader_for(path: Path):
    name = path.name.lower()
    if name.endswith(JSON_LINES_SUFFIXES):
        return _read_json_lines
    if name.endswith(PARQUET_SUFFIXES):
        return _read_parquet
    return _read_text
