"""The settings of every part of a peer, with their defaults: the one owner of each default.

Plain frozen dataclasses, cheap to import: the CLI reads its option defaults from here
(``NetworkConfig.announce_period``, ...), so a default changes in one place. The parts take
the section they need (the keeper a ``KeeperConfig``, the mover a ``ChurnConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)
DEFAULT_BOOTSTRAP_MADDRS = ("/ip4/0.0.0.0/tcp/31337",)


@dataclass(frozen=True)
class NetworkConfig:
    initial_peers: Sequence[str] = ()
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS
    announce_maddrs: Sequence[str] = ()
    identity: Optional[str] = None  # key file: the same peer id across restarts
    client_mode: bool = False  # accept no inbound connections: train through others, serve nothing
    use_relay: bool = True  # when others cannot dial this peer, serve through a relay (peer.net.relay)
    relays: Sequence[str] = ()  # relays' multiaddrs; () : the initial peers
    announce_period: float = 5.0  # seconds between DHT announcements (records live 3 periods)
    request_timeout: float = 30.0  # one stage call, one checkpoint read


@dataclass(frozen=True)
class RunConfig:
    """Which run: a loaded spec (``--spec``), or a run id whose spec the DHT publishes."""

    spec: Any = None  # protocol.spec.RunSpec
    run_id: Optional[str] = None
    spec_digest: Optional[str] = None  # pins the spec when joining by run id (the whole digest)
    trusted_keys: Sequence[str] = ()  # or: PEM public keys, one of which must sign the run's spec


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # None: the peer only serves its stage
    suffixes: Optional[Sequence[str]] = None


@dataclass(frozen=True)
class ChurnConfig:
    stage: Optional[int] = None  # None: chosen by the balancing policy
    # Seconds between rebalancing checks (randomised around it; 0: never move) and the
    # policy's cool-down after a join or a move.
    rebalance_period: float = 0.0
    rebalance_cooldown: float = 120.0
    # Samples/s announced for the stage; None: measured when the stage opens (peer.model.capacity).
    throughput: Optional[float] = None


@dataclass(frozen=True)
class KeeperConfig:
    signing_key: Path
    checkpoint_dir: Path
    every: float = 300.0  # seconds between rounds
    keep: int = 3  # signed checkpoints kept per stage
    eval_data: Optional[str] = None  # held-out text for the loss check (default: the stdlib's sources)
    eval_suffixes: Optional[Sequence[str]] = None
    loss_factor: float = 1.5
    loss_margin: float = 0.5
    request_timeout: float = 60.0
    # Two members' states agree when they differ by at most this many optimizer updates (RMS,
    # in units of the spec's learning rate): averaging noise, not a different model.
    agree_within_updates: float = 4.0


@dataclass(frozen=True)
class CheckpointConfig:
    directory: Optional[str] = None  # None: fetched checkpoints go to a temporary dir
    keeper: Optional[KeeperConfig] = None  # ``run --keeper``


@dataclass(frozen=True)
class OutputConfig:
    log_json: bool = False
    status_every: float = 5.0
    metrics_port: Optional[int] = None  # Prometheus /metrics; 0: any free port
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class PeerConfig:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    churn: ChurnConfig = field(default_factory=ChurnConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    threads: int = 1
    max_seconds: Optional[float] = None
    max_microbatches: Optional[int] = None
    final_state: Optional[str] = None  # on exit, the stage's weights (safetensors) go here


@dataclass(frozen=True)
class BootstrapConfig:
    """``swarmtrain bootstrap``: a DHT node others dial first, with a persistent identity."""

    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(host_maddrs=DEFAULT_BOOTSTRAP_MADDRS))
    spec: Any = None  # protocol.spec.RunSpec published under its run id (and needed by the keeper)
    spec_signing_key: Optional[str] = None  # a private key file: signs the published spec
    keeper: Optional[KeeperConfig] = None  # run the keeper here
    dashboard: Optional[tuple[str, int]] = None  # (host, port) of the run's web dashboard
    relay: bool = True  # answer reachability checks and relay for peers nobody can dial
    output: OutputConfig = field(default_factory=OutputConfig)
    refresh_period: float = 30.0  # seconds between publishing the spec again
    max_seconds: Optional[float] = None


DEFAULT_BOOTSTRAP_IDENTITY = "~/.swarmtrain/bootstrap.id"


@dataclass(frozen=True)
class TeacherConfig:
    """``swarmtrain teach``: a frozen model serving soft targets to one run's trainers."""

    model_dir: str
    network: NetworkConfig = field(default_factory=NetworkConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    threads: Optional[int] = None  # torch threads (None: torch's default, every core)
    max_batch_samples: Optional[int] = None  # sequences batched into one forward (None: 4 micro-batches)
    max_seconds: Optional[float] = None
