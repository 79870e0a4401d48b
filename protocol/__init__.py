"""swarmtrain's contract: the run spec, DHT keys and record schemas, RPC messages, codecs,
checkpoint manifests and signing. Pure and small; never imports ``peer``."""

# The wire's version, announced in every peer record. Peers whose major version differs
# cannot talk (see peer.swarm.dht's compatibility check); a minor bump only adds.
PROTOCOL_VERSION = "0.1.1"  # 0.1.1: teachers (records, swarmtrain.teach, soft targets)
