"""A peer's local data: datasets (text, JSONL, Parquet) and tokenizers."""

from peer.data.datasets import PackedDataset, fixed_batch
from peer.data.files import DataError, discover_files, stdlib_text_path
from peer.data.tokenizer import ByteTokenizer, FileTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "FileTokenizer",
    "PackedDataset",
    "TokenizerError",
    "discover_files",
    "fixed_batch",
    "load_tokenizer",
    "stdlib_text_path",
]
