"""A peer's checkpoint side, assembled once: the service (store, serving, announcing,
restoring) created on first use, the keeper when asked for, and the steps held per stage
(no rollback across moves). The bootstrap's keeper is assembled by the same class."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from peer.base.config import CheckpointConfig, KeeperConfig, NetworkConfig
from peer.checkpoints import CheckpointService, CheckpointStore
from peer.checkpoints.keeper import Keeper
from protocol.spec import RunSpec


class CheckpointSide:
    def __init__(
        self,
        spec: RunSpec,
        config: CheckpointConfig,
        network: NetworkConfig,
        *,
        swarm,
        p2p,
        loop,
        event: Callable,
        counters=None,
        distrust=None,
    ):
        self.spec, self.config, self.network, self.swarm, self.p2p, self.loop = spec, config, network, swarm, p2p, loop
        self.event, self.counters, self.distrust = event, counters, distrust
        self.keeper: Optional[Keeper] = None
        self._service: Optional[CheckpointService] = None
        self._tmp: Optional[str] = None
        self._held: dict[int, int] = {}

    def service(self) -> CheckpointService:
        if self._service is None:
            root = self.config.directory
            if root is None:  # fetched checkpoints go to a temporary dir
                root = self._tmp = tempfile.mkdtemp(prefix="swarmtrain-ckpt-")
            keep = self.config.keeper.keep if self.config.keeper is not None else KeeperConfig.keep
            store = CheckpointStore(Path(root).expanduser(), self.spec, keep=keep)
            self._service = CheckpointService(
                self.spec,
                store,
                swarm=self.swarm,
                p2p=self.p2p,
                run=self.loop.run,
                event=self.event,
                announce_period=self.network.announce_period,
                request_timeout=self.network.request_timeout,
                counters=self.counters,
                distrust=self.distrust,
            )
            self._service.start()
        return self._service

    def held_step(self, stage: int) -> Optional[int]:
        """The newest checkpoint step this peer loaded for ``stage`` (in this process, or in an
        earlier one that used the same --checkpoint-dir): never restore an older one."""
        steps = [s for s in (self._held.get(stage), self.service().store.held_step(stage)) if s is not None]
        return max(steps) if steps else None

    def hold(self, stage: int, step: int) -> None:
        self._held[stage] = max(step, self._held.get(stage, 0))
        self.service().store.hold(stage, step)

    def announced(self, stage: int) -> bool:
        """Whether the swarm announces a checkpoint of ``stage`` (unverified: a hint to retry)."""
        if not self.spec.trust.trusted_keys:
            return False
        try:
            return bool(self.service().announcements(stage))
        except Exception:
            return False

    def start_keeper(self, *, local_state: Callable) -> None:
        """``run --keeper``: sign checkpoints of the whole pipeline from this peer."""
        self.keeper = Keeper(
            self.spec,
            self.config.keeper,
            swarm=self.swarm,
            p2p=self.p2p,
            run=self.loop.run,
            service=self.service(),
            event=self.event,
            local_state=local_state,
        )
        self.keeper.start()

    def stop(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
        if self._service is not None:
            self._service.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
