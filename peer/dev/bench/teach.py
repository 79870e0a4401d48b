"""Teacher peers: does a teacher's soft targets make a student learn on fewer tokens, at what
cost in bytes and tokens/s? Both sides of every comparison run in this one invocation.

1. **teacher**: a larger preset (``--teacher-preset``, small) trained first on the same data
   for ``--teacher-tokens``, exported as a Hugging Face directory; its held-out loss.
2. **sim** (``teach_sim.py``): the student spec (tiny, with a ``[distill]`` section) trained on
   the same tokens with and without the teacher, ``--seeds`` seeds each, the held-out label
   cross-entropy measured every ``--eval-every`` tokens: the loss at equal tokens, and the tokens
   the teacher runs need to reach the no-teacher runs' final loss (goal: at least 1.3x fewer);
   soft-target bytes per token (goal: at most 64).
3. **swarm** (``teach_swarm.py``): tokens/s of a real 2-stage swarm with and without a
   ``swarmtrain teach`` process online.

    .venv/bin/python scripts/bench_teach.py > teach.jsonl     # full: about 30 min on 2 quiet cores
    .venv/bin/python scripts/bench_teach.py --quick           # a smoke run (tests/integration/test_bench_teach.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from peer.dev.bench import teach_sim
from peer.dev.bench.common import default_text_data, emit, eval_batches, machine, say, sigterm_as_interrupt
from peer.dev.bench.teach_swarm import bench_swarm
from peer.teach.model import TeacherModel
from protocol.spec import RunSpec, preset_spec

BENCH = "teach"
SPEEDUP_GOAL = 1.3
BYTES_GOAL = 64


def schedule(tokens: int, lr: float) -> dict:
    """A cosine schedule over a run of ``tokens`` (micro-batches of 8 x 64, steps of 32 samples)
    with a short warm-up: the loss at the end of a run is then the run's, not the luck of where a
    constant learning rate left it (at the tiny preset's constant 3e-3 the held-out loss jumps by
    up to 1.0 between evaluations)."""
    steps = max(1, tokens // (32 * 64))
    return dict(lr=lr, lr_schedule="cosine", warmup_steps=max(1, steps // 20), total_steps=steps)


def student_spec(args) -> RunSpec:
    return preset_spec(
        "tiny",
        run_id="student",
        training=schedule(args.student_tokens, 3e-3),
        distill=dict(weight=args.weight, temperature=args.temperature, k=args.k, spot_check=0.0),
    )


def teacher_spec(args) -> RunSpec:
    # The student's sequence length and micro-batch, so that it reads what the student reads.
    return preset_spec(
        args.teacher_preset,
        run_id="teacher",
        training=dict(seq_len=64, micro_batch_size=8, target_batch_size=32, **schedule(args.teacher_tokens, 1e-3)),
    )


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "sem": None, "min": None, "max": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "sem": std / len(values) ** 0.5,  # what a goal is judged with, as bench_outer does
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def bench_sim(args, spec: RunSpec, teacher: TeacherModel, train: Path, batches) -> None:
    runs = {False: [], True: []}
    for seed in range(args.seeds):
        for with_teacher in (False, True):
            say(
                f"sim: seed {seed}, {'with' if with_teacher else 'without'} the teacher, {args.student_tokens:,} tokens"
            )
            run = teach_sim.student_run(
                spec,
                train,
                batches,
                tokens=args.student_tokens,
                seed=seed,
                eval_every=args.eval_every,
                teacher=teacher if with_teacher else None,
                threads=args.threads,
            )
            runs[with_teacher].append(run)
            emit(
                BENCH,
                "student_run",
                seed=seed,
                teacher=with_teacher,
                tokens=run.tokens,
                heldout_loss=run.final,
                curve=[[t, round(loss, 5)] for t, loss in run.curve],
                seconds=run.seconds,
                tokens_per_s=run.tokens / run.seconds,
                soft_target_bytes_per_token=run.soft_target_bytes / run.soft_target_tokens if with_teacher else None,
            )
    none_final = [r.final for r in runs[False]]
    # Per seed: the teacher run against the no-teacher run of the same seed (same initial
    # weights, same micro-batches). Seeds differ more from each other than a teacher moves one.
    paired = []
    for plain, taught in zip(runs[False], runs[True]):
        reached = teach_sim.tokens_to_reach(taught.curve, plain.final)
        paired.append(taught.tokens / reached if reached else None)
    target = statistics.fmean(none_final)
    vs_mean = []
    for taught in runs[True]:
        reached = teach_sim.tokens_to_reach(taught.curve, target)
        vs_mean.append(taught.tokens / reached if reached else None)
    emit(
        BENCH,
        "heldout_loss",
        tokens=args.student_tokens,
        no_teacher=spread(none_final),
        teacher=spread([r.final for r in runs[True]]),
        teacher_vs_none_pct=spread([100 * (t.final / p.final - 1) for p, t in zip(runs[False], runs[True])]),
        teacher_model=args.teacher_preset,
    )
    s = spread(paired)
    emit(
        BENCH,
        "tokens_to_reach",
        speedup=s,
        speedup_per_seed=paired,
        speedup_vs_mean_loss=spread(vs_mean),
        mean_no_teacher_loss=target,
        goal=SPEEDUP_GOAL,
        meets_goal=s["n"] == len(paired) and s["mean"] - s["sem"] >= SPEEDUP_GOAL,
        note="per seed: student tokens / tokens the teacher run needs to reach the final held-out loss of "
        "the no-teacher run of the same seed (linear between evaluations); goal: mean - standard error >= 1.3",
    )
    per_token = [r.soft_target_bytes / r.soft_target_tokens for r in runs[True]]
    emit(
        BENCH,
        "soft_target_bytes_per_token",
        value=max(per_token),
        k=spec.distill.k,
        vocab_size=spec.model.vocab_size,
        goal=BYTES_GOAL,
        meets_goal=max(per_token) <= BYTES_GOAL,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="A smoke run: short teacher, 1 seed, short runs.")
    ap.add_argument("--only", choices=("sim", "swarm"), default=None)
    ap.add_argument("--data", default=None, help="Text to train on (default: the standard library's .py files).")
    ap.add_argument("--data-suffix", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--teacher", default=None, help="A teacher directory to reuse instead of training one.")
    ap.add_argument("--teacher-preset", default="small")
    ap.add_argument("--teacher-tokens", type=int, default=1_500_000, help="Tokens the teacher trains on.")
    ap.add_argument("--student-tokens", type=int, default=300_000)
    ap.add_argument("--eval-every", type=int, default=16_384)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swarm-seconds", type=float, default=90.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.teacher_tokens, args.student_tokens, args.eval_every = 32_768, 16_384, 4096
        args.seeds, args.swarm_seconds = 1, 25.0
    default_text_data(args)
    sigterm_as_interrupt()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-teach-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"bench_teach: work directory {work}")
    train, heldout = teach_sim.split_corpus(
        args.data, [args.data_suffix] if args.data_suffix else None, work / "corpus"
    )
    args.train_dir, args.data_suffix = str(train), None  # the split holds only files of that suffix
    spec = student_spec(args)
    emit(BENCH, "setup", machine=machine(), args={k: str(v) for k, v in vars(args).items()})
    hf_dir = Path(args.teacher) if args.teacher else work / "teacher"
    if args.teacher is None:
        say(f"teacher: {args.teacher_preset}, {args.teacher_tokens:,} tokens of training")
        trained = teach_sim.train_teacher(
            teacher_spec(args), train, hf_dir, tokens=args.teacher_tokens, threads=args.threads
        )
        emit(BENCH, "teacher_training", preset=args.teacher_preset, **trained)
    teacher = TeacherModel.load(hf_dir, spec)
    batches = eval_batches(spec, heldout, suffixes=None)
    emit(
        BENCH,
        "teacher",
        preset=args.teacher_preset,
        model_digest=teacher.digest,
        heldout_loss=teach_sim.teacher_heldout_loss(teacher, batches),
        parameters=sum(p.numel() for p in teacher.model.parameters()),
    )
    if args.only in (None, "sim"):
        bench_sim(args, spec, teacher, train, batches)
    if args.only in (None, "swarm"):
        bench_swarm(args, spec, hf_dir, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
