"""`swarmtrain demo`: a real local swarm on 127.0.0.1 on built-in defaults.

A bootstrap and several peer processes (2 stages x 2 peers by default) train a small Llama
on the Python standard library's source files, which exist on every machine. Live progress
is shown until the time budget runs out or Ctrl-C; every process is stopped by its id.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from peer.data import stdlib_text_path
from peer.dev.launcher import Cluster
from protocol.spec import preset_spec

DEFAULT_SECONDS = 150.0


def _summary_line(peers, started: float) -> tuple[str, dict]:
    losses, tok_s, epochs, per_stage = [], 0.0, {}, None
    for proc in peers:
        status = proc.last_event("status")
        if status is None:
            continue
        if status.get("loss") is not None and status.get("microbatches", 0) > 0:
            losses.append(status["loss"])
        tok_s += status.get("tokens_per_s", 0.0)
        epochs.setdefault(status["stage"], []).append(status["epoch"])
        per_stage = status.get("peers_per_stage", per_stage)
    loss = sum(losses) / len(losses) if losses else None
    stage_epochs = " ".join(f"s{k}:{max(v)}" for k, v in sorted(epochs.items()))
    text = (
        f"{time.monotonic() - started:5.0f}s | loss {loss:.3f}"
        if loss is not None
        else f"{time.monotonic() - started:5.0f}s | loss  -   "
    )
    text += f" | {tok_s:7,.0f} tok/s | epochs {stage_epochs or '-'} | peers/stage {per_stage or '-'}"
    return text, {"loss": loss, "tokens_per_s": tok_s, "peers_per_stage": per_stage, "epochs": epochs}


def run_demo(
    seconds: Optional[float] = None,
    *,
    stages: int = 2,
    peers_per_stage: int = 2,
    preset: str = "tiny",
    workdir: Optional[str] = None,
    json_summary: bool = False,
) -> int:
    seconds = seconds or DEFAULT_SECONDS
    work = Path(workdir or tempfile.mkdtemp(prefix="swarmtrain-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = preset_spec(preset, stages=stages, run_id="demo")
    spec_path = work / "spec.toml"
    spec.save(spec_path)
    data = str(stdlib_text_path())
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if json_summary else (lambda *a: print(*a, flush=True))
    say(
        f"swarmtrain demo: {stages} stages x {peers_per_stage} peers, preset {preset!r} "
        f"({sum(s.end - s.start for s in spec.stages)} layers), data: Python stdlib at {data}"
    )
    say(f"  work dir {work} (logs: bootstrap.log, peer-*.log); stopping after {seconds:.0f}s or Ctrl-C")
    first_loss = last = None
    started = time.monotonic()
    try:
        with Cluster(work) as cluster:
            _boot, maddr = cluster.bootstrap(spec_path=spec_path)
            say(f"  bootstrap up: {maddr}")
            peers = []
            for k in range(stages):
                for i in range(peers_per_stage):
                    peers.append(
                        cluster.peer(
                            f"peer-s{k}-{i}",
                            [maddr],
                            spec_path=spec_path,
                            stage=k,
                            data=data,
                            extra=["--data-suffix", ".py", "--max-seconds", str(seconds)],
                        )
                    )
            for proc in peers:
                ready = proc.wait_event("ready", 120)
                say(f"  {proc.name} ready: stage {ready['stage']}, peer id {ready['peer_id'][:16]}...")
            started = time.monotonic()
            deadline = started + seconds + 5
            next_print = started
            while time.monotonic() < deadline and any(p.alive() for p in peers):
                time.sleep(0.5)
                text, last = _summary_line(peers, started)
                if first_loss is None and last["loss"] is not None:
                    first_loss = last["loss"]
                if time.monotonic() >= next_print and last["loss"] is not None:
                    say("  " + text)
                    next_print = time.monotonic() + 5
            _, last = _summary_line(peers, started)
            trained_for = time.monotonic() - started
            say("  stopping: each peer announces 'leaving', finishes in-flight work and exits")
            for proc in peers:
                try:
                    proc.wait_event("stopped", 60)
                except (TimeoutError, RuntimeError):
                    pass
    except KeyboardInterrupt:
        say("\n  Ctrl-C: stopping every peer (SIGINT, then SIGKILL by process id)")
    final_loss = last["loss"] if last else None
    trained_for = locals().get("trained_for", time.monotonic() - started)
    summary = {
        "event": "demo_summary",
        "first_loss": first_loss,
        "final_loss": final_loss,
        "seconds": round(trained_for, 1),
        "work_dir": str(work),
        "tokens_per_s": last["tokens_per_s"] if last else None,
    }
    if json_summary:
        print(json.dumps(summary), flush=True)
    if first_loss is not None and final_loss is not None:
        say(
            f"swarmtrain demo: loss {first_loss:.3f} -> {final_loss:.3f} in {summary['seconds']:.0f}s; all processes stopped"
        )
    return 0
