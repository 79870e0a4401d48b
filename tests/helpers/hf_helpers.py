"""Hugging Face models the fine-tuning tests make themselves with ``transformers`` (random
weights, save_pretrained) and ``tokenizers``: nothing is downloaded. The test files
``pytest.importorskip`` both packages before they use these."""

from __future__ import annotations

from pathlib import Path

import torch

from cli_helpers import invoke


def make_tokenizer(path: Path, vocab_size: int) -> None:
    import tokenizers

    words = [f"w{i}" for i in range(vocab_size - 2)]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))


def make_hf(directory: Path, *, tied=False, sharded=False, rope_scaling=None, head_dim=None, seed=0) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        head_dim=head_dim,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "1GB")
    make_tokenizer(directory / "tokenizer.json", cfg.vocab_size)
    return directory


def keygen(tmp_path: Path) -> tuple[Path, Path]:
    """``swarmtrain keygen`` of the keeper's key: (private, public)."""
    key = tmp_path / "keeper.pem"
    r = invoke("keygen", key)
    assert r.exit_code == 0, r.output
    return key, key.with_suffix(".pub")
