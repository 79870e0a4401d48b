"""A training peer's side of teachers, wired: the client its trainer asks for soft targets, the
teachers' records it reads, and the verdicts it publishes (``teacherbans``).

A thread reads the run's teacher records every period (the client's routing reads that list,
never the DHT) and republishes this trainer's bans and suspensions when they change, and while
there are any, so that ``status`` and the dashboard show who was caught.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

from peer.teach.client import TeacherClient
from protocol.records import TeacherInfo

log = logging.getLogger("swarmtrain.peer")


class TeacherSide:
    def __init__(self, spec, p2p, swarm, *, counters, event: Callable, timeout: float, period: float, seed: int = 0):
        self.swarm, self.period = swarm, period
        self._teachers: Sequence[TeacherInfo] = ()
        self.client = TeacherClient(
            spec, p2p, teachers=lambda: self._teachers, counters=counters, event=event, timeout=timeout, seed=seed
        )
        self._published: dict = {"banned": [], "suspended": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="teachers", daemon=True)

    @property
    def teachers(self) -> Sequence[TeacherInfo]:
        return self._teachers

    def start(self) -> "TeacherSide":
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        try:
            self._teachers = self.swarm.teachers()
        except Exception as err:
            log.debug("reading teacher records failed: %s", err)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.refresh()
            record = self.client.bans_record()
            if record != self._published or record["banned"] or record["suspended"]:
                try:
                    if self.swarm.announce_teacher_bans(record, ttl=3 * self.period):
                        self._published = record
                except Exception as err:
                    log.debug("announcing teacher bans failed: %s", err)
