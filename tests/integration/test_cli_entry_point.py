"""The installed ``swarmtrain`` entry point, run as a process, lists every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_helpers import COMMANDS

SWARMTRAIN = Path(sys.executable).parent / "swarmtrain"


def test_installed_entry_point_lists_every_command():
    exe = [str(SWARMTRAIN)] if SWARMTRAIN.exists() else [sys.executable, "-m", "peer.cli"]
    out = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert set(COMMANDS) <= listed, out.stdout
