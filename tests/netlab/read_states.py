"""Run inside a lab host: the test's own hash of the weights each given peer serves over the
state RPC (tests/helpers/outer_helpers.round_states), as one JSON line {peer_id: [round, sha256]}."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

from protocol.spec import load_spec  # noqa: E402

from outer_helpers import round_states, state_hash  # noqa: E402

addr, spec_path, stage, *peer_ids = sys.argv[1:]
states = round_states(addr, load_spec(spec_path), int(stage), peer_ids)
print(json.dumps({pid: [r, state_hash(t)] for pid, (r, t) in zip(peer_ids, states)}), flush=True)
