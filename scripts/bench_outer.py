#!/usr/bin/env python
"""``python -m peer.dev.bench.outer`` (peer/dev/bench/outer.py), from any directory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's peer package

from peer.dev.bench.outer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
