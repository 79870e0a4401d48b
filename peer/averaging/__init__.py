"""Averaging inside a stage group: everything that touches hivemind's optimizer internals
(``optimizer``), the pure staleness rules, and the benchmarks' byte counts."""

from peer.averaging.optimizer import BoundedOptimizer, lr_lambda, make_stage_optimizer, make_torch_optimizer

__all__ = ["BoundedOptimizer", "lr_lambda", "make_stage_optimizer", "make_torch_optimizer"]
