"""The harness's one error type: something it needs is missing or a process misbehaved."""

from __future__ import annotations


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what is wrong and how to fix it."""
