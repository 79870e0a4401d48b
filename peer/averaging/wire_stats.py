"""Opt-in byte counts of gradient and state averaging, for the benchmarks.

hivemind runs each averager (gradients, optimizer state) in a child process forked from the
peer, and its all-reduce sends every tensor part as an ``AveragingData`` message whose
``tensor_part`` has already gone through the averager's compression. With
``SWARMTRAIN_WIRE_STATS=DIR`` in the environment, ``install_from_env()`` (called before the
averagers are forked, so that the children inherit it) wraps the two places that yield such
messages in ``hivemind.averaging.allreduce.AllReduceRunner``:

- ``_generate_input_for_peer``: the parts this peer sends to the other reducers;
- ``_accumulate_parts_streaming``: the averaged deltas this peer sends back as a reducer;

and counts each message's serialized size (``ByteSize()``, what goes into the stream, before
libp2p framing), by averager and by compression type. Each process keeps cumulative totals and
rewrites ``DIR/<role>-<pid>.json`` (atomically) when a stream ends. Nothing else changes: without
the variable this module does nothing. Matchmaking, the DHT and state downloads for newcomers
are not counted: they do not scale with trained tokens.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Optional

ENV = "SWARMTRAIN_WIRE_STATS"

_lock = threading.Lock()
_installed: Optional[Path] = None
_role = "unknown"
_totals: dict = {}


def install_from_env() -> bool:
    """Install the counters when ``SWARMTRAIN_WIRE_STATS`` names a directory; True if installed."""
    path = os.environ.get(ENV)
    if not path:
        return False
    install(path)
    return True


def role_of(prefix: str) -> str:
    """'grad' or 'state' from a hivemind averager prefix (``<run_id>_grad_averager`` ...)."""
    if "grad_averager" in prefix:
        return "grad"
    if "state_averager" in prefix:
        return "state"
    return "other"


def install(directory: str | os.PathLike) -> None:
    global _installed
    if _installed is not None:
        return
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.averager import DecentralizedAverager

    _installed = Path(directory)
    _installed.mkdir(parents=True, exist_ok=True)

    run = DecentralizedAverager.run

    @functools.wraps(run)
    def run_with_role(self, *args, **kwargs):
        # Runs in the averager's own (forked) process: one role per process.
        global _role
        _role = role_of(getattr(self, "prefix", ""))
        _totals.clear()  # counts inherited from the parent belong to the parent
        return run(self, *args, **kwargs)

    DecentralizedAverager.run = run_with_role
    AllReduceRunner._generate_input_for_peer = _counted(AllReduceRunner._generate_input_for_peer, "parts")
    AllReduceRunner._accumulate_parts_streaming = _counted(AllReduceRunner._accumulate_parts_streaming, "deltas")


def _counted(method, kind: str):
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            async for msg in method(self, *args, **kwargs):
                _count(kind, msg, getattr(self, "group_id", b""))
                yield msg
        finally:
            _flush()

    return wrapper


def _count(kind: str, msg, group_id: bytes) -> None:
    from hivemind.proto import runtime_pb2

    size = msg.ByteSize()
    part = msg.tensor_part
    numel = 1
    for d in part.size:
        numel *= d
    codec = runtime_pb2.CompressionType.Name(part.compression) if part.ByteSize() else "NONE"
    with _lock:
        t = _totals
        t["sent_bytes"] = t.get("sent_bytes", 0) + size
        t[f"{kind}_bytes"] = t.get(f"{kind}_bytes", 0) + size
        t["messages"] = t.get("messages", 0) + 1
        t["float32_bytes"] = t.get("float32_bytes", 0) + 4 * numel  # the same values uncompressed
        by_codec = t.setdefault("bytes_by_compression", {})
        by_codec[codec] = by_codec.get(codec, 0) + size
        groups = t.setdefault("_groups", set())
        if len(groups) < 100_000:
            groups.add(bytes(group_id))


def _flush() -> None:
    if _installed is None:
        return
    with _lock:
        data = {k: v for k, v in _totals.items() if k != "_groups"}
        data.update(role=_role, pid=os.getpid(), allreduce_groups=len(_totals.get("_groups", ())))
    path = _installed / f"{_role}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # a benchmark aid must never break averaging


def read_totals(directory: str | os.PathLike) -> dict:
    """Sum the per-process files of a directory by role: {role: {sent_bytes, ...}}."""
    out: dict = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        role = out.setdefault(data.get("role", "unknown"), {"processes": 0})
        role["processes"] += 1
        for key, value in data.items():
            if key in ("role", "pid"):
                continue
            if isinstance(value, dict):
                sub = role.setdefault(key, {})
                for k, v in value.items():
                    sub[k] = sub.get(k, 0) + v
            elif isinstance(value, (int, float)):
                role[key] = role.get(key, 0) + value
    return out
