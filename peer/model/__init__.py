"""The model: a Llama stage (``llama``), Hugging Face checkpoint I/O, and measured capacity."""

from peer.model.llama import (
    EMBED,
    HEAD,
    LlamaStage,
    build_stages,
    causal_lm_loss,
    chain_forward,
    stage_param_names,
    stage_param_shapes,
)

__all__ = [
    "EMBED",
    "HEAD",
    "LlamaStage",
    "build_stages",
    "causal_lm_loss",
    "chain_forward",
    "stage_param_names",
    "stage_param_shapes",
]
