"""swarmtrain's contract: the run spec, DHT keys and record schemas, RPC messages, codecs,
checkpoint manifests and signing. Pure and small; never imports ``peer``."""

PROTOCOL_VERSION = "0.1.0"
