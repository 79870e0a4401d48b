"""How much the capacity a peer announces (peer.model.capacity) depends on what else runs on the
machine, side by side in one run: each stage of the tiny preset measured by one process
alone, then by ``--procs`` processes measuring at the same time.

One JSON object per line on stdout:
- ``alone`` / ``contended``: per stage, the figures (samples/s) each process measured;
- ``ratio``: per stage, the median contended figure / the median figure alone.

    .venv/bin/python scripts/bench_capacity.py               # 5 processes, 3 measurements each
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout whose peer package the workers import

WORKER = """
import json, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from peer.model.capacity import measure_stage_capacity
from peer.model.llama import LlamaStage
from protocol.spec import preset_spec
spec = preset_spec("tiny", stages=2)
out = {{}}
for stage in range(spec.num_stages):
    module = LlamaStage.from_spec(spec, stage)
    out[stage] = [measure_stage_capacity(spec, module).samples_per_s for _ in range({repeats})]
print(json.dumps(out))
"""


def run(procs: int, repeats: int) -> dict[int, list[float]]:
    code = WORKER.format(root=str(ROOT), repeats=repeats)
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    figures: dict[int, list[float]] = {}
    try:
        for child in children:
            out, _ = child.communicate(timeout=600)
            if child.returncode != 0:
                raise RuntimeError(f"a measuring process exited with {child.returncode}")
            for stage, values in json.loads(out).items():
                figures.setdefault(int(stage), []).extend(values)
    finally:
        for child in children:  # by pid, also when one failed
            if child.poll() is None:
                child.kill()
                child.wait()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=5, help="processes measuring at once")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per process and stage")
    args = parser.parse_args()
    alone = run(1, args.repeats)
    contended = run(args.procs, args.repeats)
    rnd = lambda xs: [round(x, 1) for x in xs]  # noqa: E731
    print(json.dumps({"metric": "alone", "figures": {k: rnd(v) for k, v in alone.items()}}))
    print(
        json.dumps({"metric": "contended", "procs": args.procs, "figures": {k: rnd(v) for k, v in contended.items()}})
    )
    print(
        json.dumps(
            {
                "metric": "ratio",
                "contended_over_alone": {
                    k: round(statistics.median(contended[k]) / statistics.median(alone[k]), 3) for k in alone
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
