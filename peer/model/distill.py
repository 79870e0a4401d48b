"""The last stage's loss when a teacher's soft targets come with the labels.

``combined_loss`` = ``(1 - weight) * label cross-entropy + weight * temperature**2 * KL``, where
the KL runs, at every position that has a label, over the teacher's top-k tokens plus one
bucket for the rest of the vocabulary (``protocol.soft_targets``): the student's bucket
probability is one minus what it gives the teacher's top k. ``temperature**2`` keeps the
term's gradient on the scale of the label loss's as the temperature changes (Hinton et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peer.model.llama import causal_lm_loss

__all__ = ["combined_loss", "distill_kl"]

# The student's rest bucket is 1 - (what it puts on the teacher's top k); kept above zero so
# that its log stays finite when the student puts everything on those k tokens.
_MAX_TOP_MASS = 1 - 1e-6


def distill_kl(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions ``[:, :-1]`` (those with a label) of KL(teacher || student) over the
    teacher's top-k buckets and the rest, at ``temperature``, times ``temperature**2``."""
    student = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    top_ids, teacher = ids[:, :-1], logprobs[:, :-1].float()
    student_top = student.gather(-1, top_ids)
    p = teacher.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest_log = torch.log1p(-student_top.exp().sum(-1).clamp(max=_MAX_TOP_MASS))
    kl = (p * (teacher - student_top)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest_log
    return kl.mean() * temperature**2


def combined_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    weight: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to differentiate, its label cross-entropy part). Without ``soft`` targets the
    two are the label cross-entropy."""
    label = causal_lm_loss(logits, labels)
    if soft is None:
        return label, label
    kl = distill_kl(logits, soft[0], soft[1], temperature)
    return (1 - weight) * label + weight * kl, label
