"""Progress for people (one compact line) or machines (JSON lines), from any thread."""

from __future__ import annotations

import json
import sys
import threading
import time


class Output:
    """Progress for people (one compact line) or machines (JSON lines)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        # Events come from several threads (main loop, keeper, checkpoint service): one write
        # per line under a lock, so that two JSON lines never interleave. Reentrant: the
        # Ctrl-C handler prints 'stopping' on the main thread, possibly while that thread is
        # inside this method (a plain Lock deadlocked the peer there, Ctrl-C included).
        self._lock = threading.RLock()

    def event(self, name: str, text: str, **fields) -> None:
        if self.as_json:
            line = json.dumps({"event": name, "time": round(time.time(), 3), **fields})
        else:
            line = f"[swarmtrain] {text}"
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
