"""The swarmtrain client: model stages, data, stage serving, routing, averaging, checkpoints."""

__version__ = "0.1.0"
