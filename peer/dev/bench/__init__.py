"""The benchmarks: each runs as ``python -m peer.dev.bench.NAME`` (or ``scripts/bench_NAME.py``) and
prints one JSON object per measurement on stdout; ``common`` holds what they share."""
