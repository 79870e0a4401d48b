#!/usr/bin/env python
"""``python -m peer.dev.bench.capacity`` (peer/dev/bench/capacity.py), from any directory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer package

from peer.dev.bench.capacity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
