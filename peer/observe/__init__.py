"""Watching a swarm or a peer: Prometheus metrics, the dashboard, and ``swarmtrain status``."""
