"""The ``swarmtrain`` command line. It only parses options and calls into ``peer``."""

from __future__ import annotations

import sys

import click

from peer import __version__
from peer.cli_checkpoint import checkpoint, keygen
from peer.cli_spec import spec


class NotYetAvailable(click.ClickException):
    exit_code = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="swarmtrain")
def main() -> None:
    """swarmtrain: train one transformer together, peer to peer.

    Each peer holds one pipeline stage, trains on its own local data, averages compressed
    gradients with the peers of its stage, and trusts only signed checkpoints.
    """


main.add_command(spec)
main.add_command(keygen)
main.add_command(checkpoint)


@main.command()
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: a bounded demo).")
def demo(seconds):
    """Run a local demo swarm on 127.0.0.1 with built-in defaults."""
    from peer.demo import run_demo

    sys.exit(run_demo(seconds=seconds))


@main.command()
def run():
    """Join a swarm as a peer: serve a stage and train on local data."""
    raise NotYetAvailable("`swarmtrain run` arrives with the swarm issue (#3); use `swarmtrain demo` for now")


@main.command()
def bootstrap():
    """Host a bootstrap DHT node with a persistent identity."""
    raise NotYetAvailable("`swarmtrain bootstrap` arrives with the swarm issue (#3)")


@main.command()
def status():
    """Show the swarm as the DHT sees it."""
    raise NotYetAvailable("`swarmtrain status` arrives with the swarm issue (#3)")


if __name__ == "__main__":
    main()
