"""Outer rounds vs per-step averaging, side by side in one invocation.

Two parts (``--only sim`` / ``--only swarm``):

1. **sim**: a stage group of ``--members`` (4) in one process with the production arithmetic
   (``outer_sim.py`` says what is real and what is left out), on the ``tiny`` preset:
   - held-out loss at an equal number of tokens: per_step (no codec) and outer, ``--seeds``
     seeds each (a goal counts as met when the mean difference, paired by seed, plus its
     standard error stays within it: add seeds to narrow it), ``--rounds`` outer rounds of ``--inner-steps`` micro-batches per member (the
     per-step runs take as many steps as rounds x inner steps), and per_step's seed 0 once more
     (the spread of two identical runs), and per_step with blockwise8bit (seed 0);
   - averaging bytes per trained token of each (everything a round sends, see
     ``outer_sim.outer_round_bytes``/``per_step_bytes``) and their ratios;
   - the fraction of outer rounds after which every member held the same bits;
   - one of the members poisoned (sign-flipped x10, noise, NaN, a constant direction):
     outer on every seed vs the clean outer run of the same seed, per_step on seed 0 for contrast.
2. **swarm**: a real swarm (bootstrap, 2 stages x 2 peers, each in its own process), once per
   mode for ``--swarm-seconds``: tokens/s, averaging bytes per token as the peers counted them
   (outer: ``bytes_sent["averaging"]``; per_step: hivemind's all-reduce messages through
   ``SWARMTRAIN_WIRE_STATS``) and the rounds after which both members of a stage reported the
   same base digest.

One JSON object per measurement on stdout; progress on stderr.

    .venv/bin/python scripts/bench_outer.py > outer.jsonl     # full: about 40 min on 2 quiet cores
    .venv/bin/python scripts/bench_outer.py --quick           # smoke run, not for figures
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer.dev.bench.common import (
    check_choices,
    default_text_data,
    emit,
    eval_batches,
    machine,
    make_spec,
    say,
    sigterm_as_interrupt,
)
from peer.dev.bench.outer_sim import ATTACKS, RunResult, run_outer, run_per_step
from protocol.spec import RunSpec

BENCH = "outer"
LOSS_GOAL_PCT = 3.0
POISON_GOAL_PCT = 2.0
BYTES_GOAL = 100.0


def outer_spec(args, averaging: str, seed: int = 0) -> RunSpec:
    """The outer benchmark's spec: ``--preset`` in 2 stages, this averaging mode, the outer round's
    timings and, where given, its compression and outer optimizer."""
    outer = dict(round_seconds=args.round_seconds, gather_seconds=args.gather_seconds, agree_seconds=args.agree_seconds)
    # The spec's defaults unless given.
    outer.update(chunk=args.chunk, k=args.k, bits=args.bits, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
    return make_spec(args.preset, f"bench-outer-{averaging}", seed=seed, averaging=averaging, outer=outer)


def _row(mode: str, seed: int, r: RunResult, **extra) -> dict:
    return dict(
        mode=mode,
        seed=seed,
        heldout_loss=r.loss,
        tokens=r.tokens,
        averaging_bytes=r.averaging_bytes,
        averaging_bytes_per_token=r.averaging_bytes / max(1, r.tokens),
        rounds=r.rounds,
        identical_rounds=r.identical_rounds,
        dropped=r.dropped,
        clipped=r.clipped,
        finite=r.finite,
        seconds=r.seconds,
        **extra,
    )


def _timed(fn, *a, **kw) -> RunResult:
    started = time.monotonic()
    result = fn(*a, **kw)
    result.seconds = time.monotonic() - started
    return result


def _pct(a: float, b: float) -> float:
    return (a - b) / b * 100.0


def _spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, standard error of the mean (the spread a goal is judged
    with: it shrinks as seeds are added), range."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(
        mean=statistics.fmean(values),
        std=std,
        sem=std / len(values) ** 0.5,
        min=min(values),
        max=max(values),
        n=len(values),
    )


def bench_sim(args) -> None:
    torch.set_num_threads(1)
    data, suffixes = args.data, [args.data_suffix] if args.data_suffix else None
    spec_ps, batches = outer_spec(args, "per_step"), None
    batches = eval_batches(spec_ps, data, suffixes=suffixes, batches=args.eval_batches)
    steps = args.rounds * args.inner_steps
    common = dict(members=args.members, eval_batches=batches)

    def per_step(seed, **kw):
        say(f"per_step seed {seed} {kw or ''}")
        return _timed(
            run_per_step, outer_spec(args, "per_step", seed), data, suffixes, steps=steps, seed=seed, **common, **kw
        )

    def outer(seed, **kw):
        say(f"outer seed {seed} {kw or ''}")
        return _timed(
            run_outer,
            outer_spec(args, "outer", seed),
            data,
            suffixes,
            rounds=args.rounds,
            inner_steps=args.inner_steps,
            seed=seed,
            **{**common, **kw},
        )

    clean_ps, clean_outer = {}, {}
    for seed in range(args.seeds):
        clean_ps[seed] = per_step(seed)
        emit(BENCH, "run", **_row("per_step", seed, clean_ps[seed], codec="none"))
        clean_outer[seed] = outer(seed)
        emit(BENCH, "run", **_row("outer", seed, clean_outer[seed]))
    repeat = per_step(0)
    emit(BENCH, "run", **_row("per_step", 0, repeat, codec="none", repeat=True))
    eight = per_step(0, codec="blockwise8bit")
    emit(BENCH, "run", **_row("per_step", 0, eight, codec="blockwise8bit"))

    # Loss at equal tokens, paired by seed (same initial weights and data streams).
    diffs = [_pct(clean_outer[s].loss, clean_ps[s].loss) for s in range(args.seeds)]
    d = _spread(diffs)
    emit(
        BENCH,
        "heldout_loss",
        tokens_per_run=clean_ps[0].tokens,
        rounds=args.rounds,
        inner_steps=args.inner_steps,
        per_step=_spread([r.loss for r in clean_ps.values()]),
        outer=_spread([r.loss for r in clean_outer.values()]),
        per_step_blockwise8bit_seed0=eight.loss,
        outer_vs_per_step_pct=d,
        identical_per_step_runs_pct=_pct(repeat.loss, clean_ps[0].loss),
        goal_pct=LOSS_GOAL_PCT,
        meets_goal=d["mean"] + d["sem"] <= LOSS_GOAL_PCT,
    )

    # Bytes per trained token.
    bpt = {
        k: statistics.fmean(r.averaging_bytes / r.tokens for r in runs.values())
        for k, runs in (("outer", clean_outer), ("none", clean_ps))
    }
    bpt["blockwise8bit"] = eight.averaging_bytes / eight.tokens
    emit(
        BENCH,
        "averaging_bytes_per_token",
        outer=bpt["outer"],
        per_step_none=bpt["none"],
        per_step_blockwise8bit=bpt["blockwise8bit"],
        reduction_vs_none=bpt["none"] / bpt["outer"],
        reduction_vs_blockwise8bit=bpt["blockwise8bit"] / bpt["outer"],
        goal=BYTES_GOAL,
        meets_goal=bpt["none"] / bpt["outer"] >= BYTES_GOAL,
        config=dict(
            **outer_spec(args, "outer").training.outer.model_dump(), inner_steps=args.inner_steps, members=args.members
        ),
    )

    outer_runs = list(clean_outer.values())
    # The poisoned member's work is lost whatever the defence does: the same group without it
    # (its first members-1 members, the same data streams) shows what the poison itself costs.
    honest_only = {}
    for seed in range(args.poison_seeds):
        honest_only[seed] = outer(seed, members=args.members - 1)
        outer_runs.append(honest_only[seed])
        emit(BENCH, "run", **_row("outer", seed, honest_only[seed], members=args.members - 1))
    for attack in args.attacks:
        poisoned = {}
        for seed in range(args.poison_seeds):
            poisoned[seed] = outer(seed, attack=attack)
            outer_runs.append(poisoned[seed])
            emit(BENCH, "run", **_row("outer", seed, poisoned[seed], attack=attack))
        ps = per_step(0, attack=attack)
        emit(BENCH, "run", **_row("per_step", 0, ps, attack=attack, codec="none"))
        vs = _spread([_pct(poisoned[s].loss, clean_outer[s].loss) for s in poisoned])
        emit(
            BENCH,
            "poisoned",
            attack=attack,
            outer_vs_clean_outer_pct=vs,
            outer_vs_honest_members_only_pct=_spread([_pct(poisoned[s].loss, honest_only[s].loss) for s in poisoned]),
            outer_finite=all(r.finite for r in poisoned.values()),
            outer_dropped=sum(r.dropped for r in poisoned.values()),
            outer_clipped=sum(r.clipped for r in poisoned.values()),
            per_step_vs_clean_per_step_pct=_pct(ps.loss, clean_ps[0].loss) if ps.finite else None,
            per_step_finite=ps.finite,
            goal_pct=POISON_GOAL_PCT,
            meets_goal=vs["mean"] + vs["sem"] <= POISON_GOAL_PCT,
        )
    total = sum(r.rounds for r in outer_runs)
    emit(
        BENCH,
        "identical_weights",
        rounds=total,
        identical=sum(r.identical_rounds for r in outer_runs),
        fraction=sum(r.identical_rounds for r in outer_runs) / max(1, total),
        goal=1.0,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs: for development, not for figures")
    p.add_argument("--only", choices=("sim", "swarm"), default=None)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--seeds", type=int, default=None, help="seeds per mode (full 3, quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="outer rounds per run (full 20, quick 3)")
    p.add_argument(
        "--inner-steps", type=int, default=None, help="micro-batches per member per round (full 16, quick 4)"
    )
    p.add_argument("--chunk", type=int, default=None, help="outer: values per chunk (default: the spec's)")
    p.add_argument("--k", type=int, default=None, help="outer: values sent per chunk (default: the spec's)")
    p.add_argument("--bits", type=int, default=None, help="outer: bits per value (default: the spec's)")
    p.add_argument("--outer-lr", type=float, default=None, help="default: the spec's")
    p.add_argument("--outer-momentum", type=float, default=None, help="default: the spec's")
    p.add_argument("--poison-seeds", type=int, default=None, help="outer seeds per attack (full 2, quick 1)")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches of 32 (full 8, quick 2)")
    p.add_argument("--round-seconds", type=float, default=20.0, help="swarm: seconds per outer round")
    p.add_argument("--gather-seconds", type=float, default=6.0)
    p.add_argument("--agree-seconds", type=float, default=4.0)
    p.add_argument("--swarm-seconds", type=float, default=None, help="swarm: seconds per mode (full 90, quick 60)")
    p.add_argument("--data", default=None, help="text directory (default: the Python stdlib's .py files)")
    p.add_argument("--data-suffix", default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.seeds = args.seeds or (1 if q else 3)
    args.poison_seeds = min(args.seeds, args.poison_seeds or (1 if q else 2))
    args.rounds = args.rounds or (3 if q else 20)
    args.inner_steps = args.inner_steps or (4 if q else 16)
    args.eval_batches = args.eval_batches or (2 if q else 8)
    args.swarm_seconds = args.swarm_seconds or (60.0 if q else 90.0)
    args.attacks = [a for a in args.attacks.split(",") if a]
    check_choices(p, args.attacks, ATTACKS, "attack")
    default_text_data(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sigterm_as_interrupt()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swarmtrain-bench-outer-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"outer-rounds benchmark ({'quick' if args.quick else 'full'}); logs in {work}")
    emit(BENCH, "config", **{**vars(args), "workdir": str(work)}, machine=machine())
    started = time.monotonic()
    try:
        if args.only in (None, "sim"):
            bench_sim(args)
        if args.only in (None, "swarm"):
            from peer.dev.bench.outer_swarm import bench_swarm

            bench_swarm(args, work, {mode: outer_spec(args, mode) for mode in ("per_step", "outer")})
    except KeyboardInterrupt:
        say("interrupted: every process was stopped")
        return 130
    say(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
