"""An asyncio loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Optional


class LoopThread:
    """An asyncio loop in a background thread: hivemind's P2P is async, the rest is not."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="p2p-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
