"""Synthetic outcome stores for tests and benchmarks: numpy-generated rows written with executemany.

    >>> write_synthetic_store("/tmp/bench.db", requests=1_000_000)  # doctest: +SKIP
    >>> time_report("/tmp/bench.db")  # doctest: +SKIP
    2.1
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from balancer import store
from balancer.report import build_report

_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(store.REQUEST_COLUMNS)}) VALUES ({', '.join('?' * len(store.REQUEST_COLUMNS))})"
)


def write_synthetic_store(
    path: str | Path,
    *,
    requests: int,
    experiment: str = "synthetic",
    weights: Mapping[str, float] | None = None,
    conversion: Mapping[str, float] | None = None,
    latency_median_ms: Mapping[str, float] | None = None,
    error_rate: float = 0.01,
    feedback_rate: float = 0.5,
    fallback_rate: float = 0.001,
    units: int | None = None,
    start: float = 1_700_000_000.0,
    duration_s: float = 7 * 86_400.0,
    seed: int = 0,
) -> None:
    """Write one experiment (config version 1, sticky units) with binary feedback to a new store."""
    weights = dict(weights or {"model_a": 0.5, "model_b": 0.5})
    names = list(weights)
    conversion = dict(conversion or {name: 0.10 for name in names})
    latency_median_ms = dict(latency_median_ms or {name: 40.0 for name in names})
    rng = np.random.default_rng(seed)
    unit_count = units or max(requests // 5, 1)
    shares = np.array([weights[name] for name in names]) / sum(weights.values())
    unit_variant = rng.choice(len(names), size=unit_count, p=shares)
    unit = rng.integers(0, unit_count, size=requests)
    variant = unit_variant[unit]
    ts = start + np.sort(rng.uniform(0, duration_s, size=requests))
    fallback = rng.random(requests) < fallback_rate
    failed = rng.random(requests) < error_rate
    status = np.where(failed, 502, 200)
    medians = np.array([latency_median_ms[name] for name in names])[variant]
    latency = medians * rng.lognormal(0.0, 0.5, size=requests)
    variant_names = np.array(names, dtype=object)[variant]
    assignment = np.where(fallback, "fallback", "sticky").astype(object)
    unit_ids = np.char.add("u", unit.astype(str)).astype(object)
    # zero-padded ids arrive in key order, so the primary-key index is appended to, not split
    request_ids = np.char.add("r", np.char.zfill(np.arange(requests).astype(str), 9)).astype(object)
    error = np.where(failed, "upstream error", "").astype(object)
    error[~failed] = None
    rows = zip(
        request_ids.tolist(), ts.tolist(), [experiment] * requests, [1] * requests, variant_names.tolist(),
        variant_names.tolist(), assignment.tolist(), unit_ids.tolist(), status.tolist(), latency.tolist(),
        error.tolist(), strict=True,
    )
    has_feedback = (rng.random(requests) < feedback_rate) & ~failed
    p_success = np.array([conversion[name] for name in names])[variant]
    values = (rng.random(requests) < p_success).astype(float)
    feedback = zip(
        request_ids[has_feedback].tolist(), (ts[has_feedback] + 60.0).tolist(), values[has_feedback].tolist(),
        strict=True,
    )
    body = f"name: {experiment}\nvariants:\n" + "".join(
        f"  - name: {name}\n    weight: {weights[name]}\n    upstreams: [http://{name}:8000]\n" for name in names
    )
    connection = store.connect(path)
    try:
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("BEGIN")
        connection.executemany(_INSERT_REQUEST, rows)
        connection.executemany("INSERT INTO feedback (request_id, ts, value) VALUES (?, ?, ?)", feedback)
        connection.execute(
            "INSERT INTO configs (version, hash, ts, experiment, status, control, weights, body) "
            "VALUES (1, 'synthetic', ?, ?, 'running', ?, ?, ?)",
            (start, experiment, names[0], json.dumps(weights), body),
        )
        connection.execute("COMMIT")
    finally:
        connection.close()


def time_report(path: str | Path, *, repeat: int = 1) -> float:
    """Best wall-clock seconds of `build_report(path)` over `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        build_report(path)
        best = min(best, time.perf_counter() - started)
    return best
