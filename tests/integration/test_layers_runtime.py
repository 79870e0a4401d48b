"""A running peer's imports, seen from a fresh interpreter: it never imports the developer tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_running_peer_never_imports_dev():
    code = (
        "import sys; import peer.node.peer, peer.node.bootstrap, peer.observe.dashboard, peer.observe.status, "
        "peer.cli.main; bad = sorted(m for m in sys.modules if m.startswith('peer.dev')); print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
