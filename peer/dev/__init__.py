"""For developers and benchmarks: the local process launcher, the demo and single-process
training. A running peer never imports this package."""
