"""What every layer uses: event output, the asyncio loop thread, process hygiene.

Imports nothing else from ``peer``, so that ``observe`` and ``node`` can both use it."""

from peer.base.loop import LoopThread
from peer.base.output import Output

__all__ = ["LoopThread", "Output"]
