"""The command line (click only): parses options and calls ``node``, ``observe`` and ``dev``."""
