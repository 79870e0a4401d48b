"""Tokenizers: the built-in byte-level one, or a local ``tokenizer.json`` pinned by SHA-256.

Every peer of a run must map text to the same ids, otherwise the stages train on garbage. The
byte tokenizer needs nothing on disk; a file tokenizer is checked against the digest in the run
spec before it is used, so a peer with a different file refuses to start instead of silently
poisoning the swarm.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional, Protocol, Union

from protocol.spec import BYTE_VOCAB_SIZE, TokenizerSpec

# Checked in this order: the first one the vocabulary has becomes the end-of-document id.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message names the file and what is wrong."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus 256 as end of document."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_VOCAB_SIZE - 1

    def encode(self, text: str) -> list[int]:
        # "replace": a lone surrogate (JSON allows "\ud800") must not stop training.
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class FileTokenizer:
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``)."""

    def __init__(self, path: Union[str, Path]):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"cannot load tokenizer {self.path}: {err}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for i in (self._tok.token_to_id(t) for t in EOS_CANDIDATES) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS/CLS...): document boundaries are the data layer's job.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"FileTokenizer({str(self.path)!r})"


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(spec: TokenizerSpec, base_dir: Optional[Path] = None) -> Union[ByteTokenizer, FileTokenizer]:
    """The tokenizer a run spec names; a relative file path is taken from ``base_dir``."""
    if spec.kind == "bytes":
        return ByteTokenizer()
    path = Path(spec.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {path} not found (the run spec expects a tokenizer.json with SHA-256 {spec.sha256})"
        )
    try:
        actual = file_sha256(path)
    except OSError as err:
        raise TokenizerError(f"cannot read tokenizer file {path}: {err.strerror or err}") from None
    if actual != spec.sha256:
        raise TokenizerError(
            f"tokenizer file {path} does not match the run spec: expected SHA-256 {spec.sha256}, got {actual}"
        )
    return FileTokenizer(path)
