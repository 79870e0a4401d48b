"""Averaging inside a stage group, in either mode: a stage's optimizer is a ``StageOptimizer``
(``stage_optimizer``), built by ``make_stage_optimizer`` (per_step, ``per_step``) or as an
``OuterOptimizer`` with its ``OuterGroup`` (outer rounds, ``outer`` and ``group``)."""

from peer.averaging.optimizer import BoundedOptimizer, lr_lambda, make_torch_optimizer
from peer.averaging.per_step import PerStepOptimizer, make_stage_optimizer
from peer.averaging.stage_optimizer import OptimizerFigures, StageOptimizer

__all__ = [
    "BoundedOptimizer",
    "OptimizerFigures",
    "PerStepOptimizer",
    "StageOptimizer",
    "lr_lambda",
    "make_stage_optimizer",
    "make_torch_optimizer",
]
