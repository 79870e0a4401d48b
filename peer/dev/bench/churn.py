"""Churn benchmark, side by side in one run: the same swarm with and without churn.

Both runs: a bootstrap and STAGES x PEERS_PER_STAGE peers (pinned stages, one torch thread
each, every peer trains on the Python standard library's sources) train the tiny model for
``--seconds`` once every peer is training. In the churn run, a third of the peers are
SIGKILLed at random moments (seeded) and each is replaced at once by a new peer started with
``--stage auto``, which picks the stage with the least throughput. Every peer rebalances
(``--rebalance-period``, ``--rebalance-cooldown``): right after a crash the dead peer's record
is still in the DHT (three announce periods), so a replacement may pick the wrong stage and the
policy then moves a peer.

Measurements (one JSON object per line on stdout, progress on stderr):
- ``run``: per run, the swarm's tokens/s over the measured window (every trainer's tokens, the
  killed ones' up to their death), the trainers' last training-loss EMA, and the held-out loss
  of the final weights (each stage's weights from the surviving peer of that stage with the
  highest epoch, on fixed batches);
- ``churn_vs_steady``: churn / no churn for tokens/s and final loss (goal: loss within 5%);
- ``join``: per replacement, seconds from its start (process spawn) to its first contributed
  step (event ``contributing``: its stage accumulated a micro-batch or its trainer finished
  one), and to ``ready`` (goal: productive within 15 s on the tiny model);
- ``recovery``: per kill, seconds until the swarm's tokens/s over a forward window is back to
  90% of its rate before the kill (goal: within 30 s).

    .venv/bin/python scripts/bench_churn.py                 # 2 x 3 peers, 240 s per run
    .venv/bin/python scripts/bench_churn.py --quick         # 2 x 2 peers, 90 s per run (a smoke run)

Every process is started through ``peer.dev.launcher.Cluster`` and waited on through its JSON
events; everything is killed on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import bisect
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from peer.data import stdlib_text_path
from peer.dev.bench.common import emit, eval_batches, eval_loss, make_spec, say, sigterm_as_interrupt
from peer.dev.launcher import Cluster, Proc
from protocol.spec import RunSpec

BENCH = "churn"
READY_TIMEOUT = 300.0


# --- the swarm's throughput, from every peer's status events -------------------------------------


def token_series(procs: list[Proc]) -> list[list[tuple[float, int]]]:
    """Per peer, (wall time, cumulative tokens it trained) from its status events."""
    out = []
    for p in procs:
        points = [(e["time"], e["tokens"]) for e in p.events if e.get("event") == "status" and "tokens" in e]
        if points:
            out.append(points)
    return out


def swarm_tokens(series: list[list[tuple[float, int]]], t: float) -> int:
    """Tokens the whole swarm had trained at time t (each peer's last report at or before t)."""
    total = 0
    for points in series:
        i = bisect.bisect_right([p[0] for p in points], t)
        if i:
            total += points[i - 1][1]
    return total


def rate(series, t0: float, t1: float) -> float:
    return (swarm_tokens(series, t1) - swarm_tokens(series, t0)) / max(t1 - t0, 1e-9)


def recovery_seconds(
    series,
    kill_at: float,
    end: float,
    *,
    before: float = 30.0,
    window: float = 15.0,
    step: float = 0.5,
    level: float = 0.9,
) -> tuple[Optional[float], float]:
    """(seconds after the kill until the swarm's rate over the next ``window`` seconds is back
    to ``level`` x its rate over the ``before`` seconds before the kill, baseline rate); None
    if it never was before ``end``. The windows are long because the rate of a healthy swarm
    already dips for seconds at a time (averaging rounds, a loaded machine)."""
    baseline = rate(series, kill_at - before, kill_at)
    t = kill_at
    while t + window <= end:
        if rate(series, t, t + window) >= level * baseline:
            return t - kill_at, baseline
        t += step
    return None, baseline


# --- the final weights ------------------------------------------------------------------------


def final_epoch(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("epoch", -1))


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Member:
    proc: Proc
    stage: Optional[int]  # None: --stage auto (a replacement)
    final: Path
    spawned: float
    killed_at: Optional[float] = None
    events: dict = field(default_factory=dict)


class Run:
    def __init__(self, name: str, spec_path: Path, spec: RunSpec, workdir: Path, args):
        self.name, self.spec_path, self.spec, self.args = name, spec_path, spec, args
        self.cluster = Cluster(workdir)
        self.members: list[Member] = []
        self.addr: Optional[str] = None
        self._n = 0

    def start_peer(self, stage: Optional[int]) -> Member:
        self._n += 1
        name = f"p{self._n:02d}" + ("-auto" if stage is None else f"-s{stage}")
        final = self.cluster.workdir / f"{name}.safetensors"
        extra = [
            "--data-suffix",
            ".py",
            "--final-state",
            str(final),
            "--status-every",
            "1",
            "--request-timeout",
            str(self.args.request_timeout),
        ]
        # Every peer may move (a pinned one only with an explicit period): a replacement can
        # land on the wrong stage while the dead peer's record has not expired yet, and the
        # policy may name any peer to fix that, not only the newcomer.
        extra += [
            "--rebalance-period",
            str(self.args.rebalance_period),
            "--rebalance-cooldown",
            str(self.args.rebalance_cooldown),
        ]
        spawned = time.time()
        proc = self.cluster.peer(
            name, [self.addr], spec_path=self.spec_path, stage=stage, data=str(self.args.data), extra=extra
        )
        member = Member(proc, stage, final, spawned)
        self.members.append(member)
        return member

    def live(self) -> list[Member]:
        return [m for m in self.members if m.killed_at is None and m.proc.alive()]

    def run(self, kills: list[float], rng: random.Random) -> dict:
        args, spec = self.args, self.spec
        say(f"[{self.name}] starting a bootstrap and {spec.num_stages} x {args.peers_per_stage} peers")
        _, self.addr = self.cluster.bootstrap(spec_path=self.spec_path, timeout=READY_TIMEOUT)
        for k in range(spec.num_stages):
            for _ in range(args.peers_per_stage):
                self.start_peer(k)
        for m in self.members:
            m.proc.wait_event("ready", READY_TIMEOUT)
        for m in self.members:
            m.proc.wait_event("status", READY_TIMEOUT, lambda e: e["microbatches"] > 0)
        start = time.time()
        end = start + args.seconds
        say(
            f"[{self.name}] all {len(self.members)} peers train; measuring for {args.seconds:.0f}s"
            + (f", killing {len(kills)} at +{', +'.join(f'{k:.0f}' for k in kills)}s" if kills else "")
        )
        kill_log = []
        for offset in kills:
            while time.time() < start + offset:
                time.sleep(0.2)
            victims = self._killable()
            victim = rng.choice(victims)
            victim.killed_at = time.time()
            self.cluster.kill(victim.proc)
            replacement = self.start_peer(None)
            kill_log.append((victim, replacement))
            say(
                f"[{self.name}] +{victim.killed_at - start:.0f}s killed {victim.proc.name}, started "
                f"{replacement.proc.name}"
            )
        while time.time() < end:
            time.sleep(0.5)
        live = self.live()
        say(f"[{self.name}] stopping {len(live)} peers")
        for m in live:
            m.proc.popen.send_signal(signal.SIGINT)
        for m in live:
            try:
                m.proc.popen.wait(timeout=90)
            except Exception:
                pass
        self.cluster.close()
        return self._measure(start, end, kill_log)

    def _killable(self) -> list[Member]:
        """Original peers whose stage keeps another live peer (a kill never empties a stage)."""
        live = self.live()
        per_stage: dict = {}
        for m in live:
            stage = m.stage if m.stage is not None else (m.proc.last_event("ready") or {}).get("stage")
            per_stage.setdefault(stage, []).append(m)
        return [m for m in live if m.stage is not None and len(per_stage.get(m.stage, [])) >= 2]

    def _measure(self, start: float, end: float, kill_log) -> dict:
        series = token_series([m.proc for m in self.members])
        tokens = swarm_tokens(series, end) - swarm_tokens(series, start)
        losses = [
            m.proc.last_event("status")["loss"]
            for m in self.members
            if m.killed_at is None and m.proc.last_event("status") and m.proc.last_event("status")["loss"]
        ]
        finals = {}
        for m in self.members:
            if m.killed_at is None and m.final.is_file():
                ready = m.proc.last_event("moved") or m.proc.last_event("ready") or {}
                stage = ready.get("to", ready.get("stage"))
                epoch = final_epoch(m.final)
                if stage is not None and (stage not in finals or epoch > finals[stage][0]):
                    finals[stage] = (epoch, m.final)
        stage_files = [finals[k][1] if k in finals else Path("/nonexistent") for k in range(self.spec.num_stages)]
        held_out = eval_loss(self.spec, stage_files, self.args.eval_batches)
        result = emit(
            BENCH,
            "run",
            run=self.name,
            seconds=end - start,
            tokens=tokens,
            tokens_per_s=tokens / (end - start),
            train_loss=sum(losses) / len(losses) if losses else None,
            final_loss=held_out,
            final_epochs={k: v[0] for k, v in finals.items()},
            peers=len(self.members),
            kills=len(kill_log),
        )
        for victim, replacement in kill_log:
            p = replacement.proc
            contributing, ready = p.last_event("contributing"), p.last_event("ready")
            emit(
                BENCH,
                "join",
                run=self.name,
                peer=p.name,
                stage=(ready or {}).get("stage"),
                seconds_to_ready=ready["time"] - replacement.spawned if ready else None,
                seconds_to_first_step=contributing["time"] - replacement.spawned if contributing else None,
                peer_reported_seconds=contributing["seconds"] if contributing else None,
                phases=join_phases(p, replacement.spawned),
            )
            recovered, baseline = recovery_seconds(series, victim.killed_at, end)
            emit(
                BENCH,
                "recovery",
                run=self.name,
                killed=victim.proc.name,
                at_s=victim.killed_at - start,
                seconds_to_90pct=recovered,
                baseline_tokens_per_s=baseline,
            )
        return result


# A joining peer's milestones, in the order they happen (peer.node.peer events).
JOIN_PHASES = ("starting", "stage", "restored", "restore_skipped", "capacity", "catch_up", "ready", "contributing")


def join_phases(proc: Proc, spawned: float) -> dict:
    """Seconds from the process spawn to the first of each milestone event: where a newcomer's
    time to its first step goes (start-up and imports, DHT join, checkpoint, capacity,
    live catch-up, the first micro-batch)."""
    phases = {}
    for event in proc.events:
        name = event.get("event")
        if name in JOIN_PHASES and name not in phases:
            phases[name] = round(event["time"] - spawned, 2)
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="measured seconds per run")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--peers-per-stage", type=int, default=3)
    parser.add_argument("--kill-fraction", type=float, default=1 / 3)
    parser.add_argument("--rebalance-period", type=float, default=5.0, help="of every peer")
    parser.add_argument("--rebalance-cooldown", type=float, default=30.0, help="of every peer")
    parser.add_argument("--request-timeout", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=stdlib_text_path())
    parser.add_argument("--workdir", type=Path, default=None, help="logs go here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="2 x 2 peers, 90 s per run")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.peers_per_stage = 90.0, 2

    sigterm_as_interrupt()
    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-churn-"))
    spec = make_spec("tiny", "benchchurn", stages=args.stages)
    spec_path = workdir / "spec.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    spec.save(spec_path)
    args.eval_batches = eval_batches(spec, args.data, suffixes=[".py"])

    n = args.stages * args.peers_per_stage
    n_kills = max(1, round(n * args.kill_fraction))
    rng = random.Random(args.seed)
    # Kill moments: spread over the middle of the run, at least 20 s apart, so that each
    # recovery is measured on its own and the end of the run sees the swarm settled.
    slots = sorted(rng.uniform(0.15, 0.5) * args.seconds for _ in range(n_kills))
    kills = []
    for t in slots:
        kills.append(max(t, kills[-1] + 20.0) if kills else t)
    emit(
        BENCH,
        "config",
        seconds=args.seconds,
        stages=args.stages,
        peers_per_stage=args.peers_per_stage,
        kills=n_kills,
        kill_at_s=kills,
        seed=args.seed,
        rebalance_period=args.rebalance_period,
        rebalance_cooldown=args.rebalance_cooldown,
        workdir=str(workdir),
        cpus=os.cpu_count(),
        loadavg_1m=os.getloadavg()[0],
        python=platform.python_version(),
        torch=torch.__version__,
    )
    results = {}
    for name, schedule in (("no_churn", []), ("churn", kills)):
        run = Run(name, spec_path, spec, workdir / name, args)
        try:
            results[name] = run.run(schedule, random.Random(args.seed + 1))
        finally:
            run.cluster.close()
    steady, churn = results["no_churn"], results["churn"]
    emit(
        BENCH,
        "churn_vs_steady",
        tokens_per_s_ratio=churn["tokens_per_s"] / max(steady["tokens_per_s"], 1e-9),
        final_loss_ratio=(
            churn["final_loss"] / steady["final_loss"] if churn["final_loss"] and steady["final_loss"] else None
        ),
        goal_final_loss_ratio_max=1.05,
        loadavg_1m=os.getloadavg()[0],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
