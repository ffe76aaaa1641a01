"""`make bench` (issue #9): the balancer against direct calls and nginx, on no-op and real model backends.

`python -m bench [--quick] [--profile]` installs what it needs, starts every process on
loopback, measures all configurations in interleaved rounds and writes BENCHMARKS.md.
"""
