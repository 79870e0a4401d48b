"""The Llama-family transformer, built one pipeline stage at a time.

The whole model is in this file. A stage holds a half-open range of decoder blocks; stage 0
also holds the token embedding, the last stage the final norm and the LM head. Parameter names
are exactly those of Hugging Face ``LlamaForCausalLM`` with global layer indices, so a stage's
``state_dict()`` is a slice of an HF checkpoint and the pieces of all stages form one.

Initialisation is a pure function of (spec seed, parameter name): every peer that builds stage k
gets the same weights, and every partition of a spec gives the same full model.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from protocol.spec import ModelSpec, RunSpec

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as HF does: half-precision activations stay stable and match it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelSpec, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies, as Hugging Face computes them for the spec's scaling."""
    dim = cfg.attn_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than the original context / low_freq_factor are scaled by
    # 1/factor, shorter than original / high_freq_factor kept, and a linear ramp in between.
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelSpec, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF RoPE tables for positions 0..seq_len-1, each [seq_len, head_dim]."""
    inv_freq = rope_inv_freq(cfg, device)
    freqs = torch.arange(seq_len, dtype=torch.float, device=device)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's rotate_half layout (halves, not interleaved pairs): checkpoints depend on it.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelSpec):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_head:  # grouped-query attention: kv head j serves a run of query heads
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelSpec):
        super().__init__()
        # Declared in HF's order, so that state_dict() lists tensors exactly as HF does.
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(nn.Module):
    """Decoder blocks ``[layer_start, layer_end)``, plus the embedding and/or the head.

    ``forward`` takes token ids [B, T] when the stage has the embedding, hidden states
    [B, T, hidden] otherwise, and returns logits [B, T, vocab] when it has the head, hidden
    states otherwise. Positions are always 0..T-1.
    """

    def __init__(self, cfg: ModelSpec, layer_start: int, layer_end: int, *, has_embedding: bool, has_head: bool):
        super().__init__()
        if not 0 <= layer_start <= layer_end <= cfg.num_hidden_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is outside 0..{cfg.num_hidden_layers}")
        self.cfg = cfg
        self.layer_start, self.layer_end = layer_start, layer_end
        self.has_embedding, self.has_head = has_embedding, has_head
        # A bare container, so that names come out as HF's: "model.layers.<global index>...".
        self.model = nn.Module()
        if has_embedding:
            self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(layer_start, layer_end)})
        if has_head:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # One module holding both ends shares one Parameter: exact HF semantics, gradients summed.
        # When the ends live on different stages (different peers), the last stage holds its own
        # lm_head.weight, initialised equal to the embedding (see _init_name). Training then
        # updates the two as untied copies; export writes both tensors and sets
        # tie_word_embeddings=false once they differ.
        if self.cfg.tie_word_embeddings and self.has_embedding and self.has_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_spec(cls, spec: RunSpec, stage: int, *, init: bool = True) -> "LlamaStage":
        """Stage ``stage`` of ``spec``; with ``init=False`` the weights are uninitialised memory,
        to be filled by a loader."""
        module = _meta_stage(spec, stage)
        module.to_empty(device="cpu")
        module.tie_weights()  # to_empty allocates each module's tensors separately
        if init:
            module.init_weights(spec.seed)
        return module

    def _init_name(self, name: str) -> str:
        return EMBED if name == HEAD and self.cfg.tie_word_embeddings else name

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, p in self.named_parameters():
            if p.ndim == 1:  # RMSNorm gains: the only 1-D parameters (no biases in Llama)
                p.fill_(1.0)
                continue
            g = torch.Generator().manual_seed(param_seed(seed, self._init_name(name)))
            # Drawn on CPU in float32, then copied: the same numbers on any device and dtype.
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, self.cfg.initializer_range, generator=g))

    @torch.no_grad()
    def load_parameters(self, state: Mapping[str, torch.Tensor], *, source: str = "state") -> None:
        """Copy ``state`` (one tensor per distinct parameter name, as ``named_parameters()``
        lists them) into this stage. Names and shapes are checked before any copy: a state
        that does not fit leaves the module untouched (ValueError naming ``source``)."""
        params = dict(self.named_parameters())
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise ValueError(
                f"{source}: does not fit the module: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for name, p in params.items():
            if tuple(p.shape) != tuple(state[name].shape):
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, module has {tuple(p.shape)}")
        for name, p in params.items():
            p.copy_(state[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_embedding:
            if x.dim() != 2 or x.dtype.is_floating_point:
                raise ValueError(f"stage with the embedding expects token ids [B, T], got {x.dtype} {tuple(x.shape)}")
            x = self.model.embed_tokens(x)
        elif x.dim() != 3 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"expected hidden states [B, T, {self.cfg.hidden_size}], got {tuple(x.shape)}")
        cos, sin = rope_cos_sin(self.cfg, x.shape[1], x.device, x.dtype)
        for block in self.model.layers.values():
            x = block(x, cos, sin)
        if self.has_head:
            x = self.lm_head(self.model.norm(x))
        return x


def param_seed(seed: int, name: str) -> int:
    """Generator seed of one parameter: depends on the run seed and the HF name only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _meta_stage(spec: RunSpec, stage: int) -> LlamaStage:
    if not 0 <= stage < spec.num_stages:
        raise ValueError(f"stage {stage} does not exist: the spec has {spec.num_stages} stage(s)")
    s = spec.stages[stage]
    with torch.device("meta"):
        return LlamaStage(spec.model, s.start, s.end, has_embedding=stage == 0, has_head=stage == spec.num_stages - 1)


def stage_param_shapes(spec: RunSpec, stage: int) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every distinct parameter of a stage, without allocating weights.
    A tied single-stage model lists ``model.embed_tokens.weight`` only, as HF checkpoints do."""
    return {name: tuple(p.shape) for name, p in _meta_stage(spec, stage).named_parameters()}


def stage_param_names(spec: RunSpec, stage: int) -> list[str]:
    return list(stage_param_shapes(spec, stage))


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; equal to HF ``LlamaForCausalLM(ids, labels=ids).loss``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def build_stages(spec: RunSpec) -> list[LlamaStage]:
    return [LlamaStage.from_spec(spec, k) for k in range(spec.num_stages)]


def chain_forward(stages: list[LlamaStage], input_ids: torch.Tensor) -> torch.Tensor:
    x = input_ids
    for stage in stages:
        x = stage(x)
    return x
