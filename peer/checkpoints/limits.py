"""What a checkpoint of a stage may weigh, and the check of a listing against it (pure)."""

from __future__ import annotations

import logging
import re
from typing import Mapping

from peer.checkpoints.store import (
    expected_stage_shapes,
)
from protocol.checkpoint import (
    CHECKPOINT_FILES,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
)
from protocol.spec import RunSpec

log = logging.getLogger("swarmtrain.ckpt")

DATA_FRAME_BYTES = 1 << 20  # one data frame (under the 4 MiB frame cap)
MAX_READ_BYTES = 8 << 20  # one read request
MAX_SIGNATURES = 16
MAX_META_BYTES = 64 << 10
MAX_SIGNATURE_BYTES = 256 << 10
SIG_NAME = re.compile(r"signatures/[0-9a-f]{16}\.sig")  # fullmatch
DIGEST = re.compile(r"[0-9a-f]{64}")  # fullmatch


class SourceFailed(RuntimeError):
    """One source could not deliver (unreachable, error reply, bad data); others may."""


class FetchFailed(RuntimeError):
    """No source delivered the checkpoint; the message lists what each one did."""


# ---------------------------------------------------------------------------------------------
# limits (pure)


def file_size_limits(spec: RunSpec, stage: int) -> dict[str, int]:
    """The largest size a file of a checkpoint of ``stage`` may have: what a stranger may make
    us download. Model: every parameter in float64 plus the header; optimizer: three times that."""
    numel = 0
    for shape in expected_stage_shapes(spec, stage).values():
        n = 1
        for d in shape:
            n *= d
        numel += n
    model = 8 * numel + (1 << 20)
    return {META_FILE: MAX_META_BYTES, MODEL_FILE: model, OPTIMIZER_FILE: 3 * model}


def check_listing(files: Mapping[str, int], limits: Mapping[str, int], *, source: str = "source") -> None:
    """A listing from a stranger: only checkpoint files and signatures, sizes within limits."""
    if not files:
        raise SourceFailed(f"{source}: empty file list")
    sigs = [n for n in files if n.startswith("signatures/")]
    for name, size in files.items():
        if name in CHECKPOINT_FILES:
            limit = limits[name]
        elif SIG_NAME.fullmatch(name):
            limit = MAX_SIGNATURE_BYTES
        else:
            raise SourceFailed(f"{source}: lists {name!r}, which is not part of a checkpoint")
        if size > limit:
            raise SourceFailed(
                f"{source}: {name} is {size} bytes, more than the {limit} bytes it can be for this stage"
            )
    for name in (META_FILE, MODEL_FILE):
        if name not in files:
            raise SourceFailed(f"{source}: the listing lacks {name}")
    if not sigs:
        raise SourceFailed(f"{source}: the listing has no signature")
    if len(sigs) > MAX_SIGNATURES:
        raise SourceFailed(f"{source}: {len(sigs)} signature files (at most {MAX_SIGNATURES})")
