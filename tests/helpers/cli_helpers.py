"""The ``swarmtrain`` command line run in this process, by click's test runner."""

from __future__ import annotations

from click.testing import CliRunner, Result

from peer.cli.main import main

# Every command ``swarmtrain --help`` must list.
COMMANDS = ("demo", "run", "bootstrap", "status", "keygen", "spec", "checkpoint")


def invoke(*args, catch_exceptions: bool = True) -> Result:
    """``swarmtrain ARGS`` (each argument str()-ed): the exit code and output in a click Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=catch_exceptions)


def run(*args) -> Result:
    """``invoke``, but an exception inside the command fails the test with its own traceback."""
    return invoke(*args, catch_exceptions=False)
