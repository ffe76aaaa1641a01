"""A run's raw results as JSON, written beside its report, so the report can be rendered again without the load.

`make bench` writes `BENCHMARKS.json` next to `BENCHMARKS.md`; after a change to the report's
wording or to a statistic computed from the samples,

    .venv/bin/python -m bench --render BENCHMARKS.json

writes `BENCHMARKS.md` again from the same measurements (16 minutes of load saved, and the
figures stay those of the run the file names).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.loop_stalls import Stalls
from bench.perf_profile import PerfProfile
from bench.procstat import CpuUsage
from bench.profile import Profile
from bench.results import BenchResults
from bench.runs import FixedRateSample, SaturationSample, Settings
from bench.same_core import CoreShare, SameCorePair
from bench.stack import Target
from bench.tail_episodes import Episode, TailRun

FORMAT = 1  # bumped when a field changes meaning; an older file is refused rather than misread


def save(results: BenchResults, path: Path) -> None:
    """Write `results` as JSON (NaN kept as NaN, as Python's json reads it back)."""
    # asdict rebuilds a Counter from its (key, count) pairs, which counts the pairs: the profile goes by hand.
    fields = dataclasses.asdict(dataclasses.replace(results, profile=None))
    if results.profile is not None:
        fields["profile"] = {field.name: getattr(results.profile, field.name) for field in dataclasses.fields(Profile)}
    document = {"format": FORMAT, "results": fields}
    path.write_text(json.dumps(document, indent=1, default=_encode) + "\n")


def load(path: Path) -> BenchResults:
    """The results a `save` wrote; BenchError when the file is missing, not JSON or of another format."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read bench results from {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise BenchError(f"{path} holds bench results of format {found!r}; this harness reads format {FORMAT}")
    fields = dict(document["results"])
    try:
        # files from before fixed_rate_rounds ran the fixed-rate runs in as many rounds as the others
        fields["settings"] = Settings(**{"fixed_rate_rounds": fields["settings"]["rounds"], **fields["settings"]})
        fields["targets"] = [_target(target) for target in fields["targets"]]
        fields["saturation"] = {name: [_saturation(sample) for sample in samples]
                                for name, samples in fields["saturation"].items()}
        fields["fixed_rate"] = {name: [_fixed_rate(sample) for sample in samples]
                                for name, samples in fields["fixed_rate"].items()}
        fields["started"] = datetime.fromisoformat(fields["started"])
        fields["profile"] = None if fields["profile"] is None else _profile(fields["profile"])
        fields["loop_stalls"] = [Stalls(**stalls) for stalls in fields["loop_stalls"]]
        fields["cost_steal"] = [tuple(pair) for pair in fields.get("cost_steal", [])]
        fields["perf_profiles"] = [_perf_profile(profile) for profile in fields.get("perf_profiles", [])]
        fields["fixed_rate_pinned"] = {name: [_fixed_rate(sample) for sample in samples]
                                       for name, samples in fields.get("fixed_rate_pinned", {}).items()}
        fields["priority_targets"] = [_target(target) for target in fields.get("priority_targets", [])]
        fields["workers_fixed_rate"] = {name: [_fixed_rate(sample) for sample in samples]
                                        for name, samples in fields.get("workers_fixed_rate", {}).items()}
        fields["cold_start"] = [[_fixed_rate(sample) for sample in samples] for samples in fields.get("cold_start", [])]
        fields["same_core"] = {label: [_same_core_pair(pair) for pair in pairs]
                               for label, pairs in fields.get("same_core", {}).items()}
        fields["tail_runs"] = [TailRun(**{**run, "groups": _shares(run.get("groups", {})),
                                          "episodes": [Episode(**{**episode, "groups": _shares(episode.get("groups", {}))})
                                                       for episode in run["episodes"]]})
                               for run in fields.get("tail_runs", [])]
        return BenchResults(**fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{path} is not a complete bench results file: {type(exc).__name__}: {exc}") from exc


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to a bench results file")


def _shares(groups: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {name: (running, waiting) for name, (running, waiting) in groups.items()}


def _cpu(fields: dict[str, float] | None) -> CpuUsage | None:
    return None if fields is None else CpuUsage(**fields)


def _target(fields: dict[str, Any]) -> Target:
    return Target(**{**fields, "spread": tuple(fields["spread"]), "backend_pids": tuple(fields["backend_pids"]),
                     "command": tuple(fields["command"])})


def _saturation(fields: dict[str, Any]) -> SaturationSample:
    return SaturationSample(**{**fields, "proxy_cpu": _cpu(fields["proxy_cpu"]), "backend_cpu": _cpu(fields["backend_cpu"]),
                               "writer_cpu": _cpu(fields.get("writer_cpu"))})


def _fixed_rate(fields: dict[str, Any]) -> FixedRateSample:
    return FixedRateSample(**{**fields, "proxy_cpu": _cpu(fields["proxy_cpu"]),
                              "backend_cpu": _cpu(fields.get("backend_cpu"))})


def _same_core_pair(fields: dict[str, Any]) -> SameCorePair:
    return SameCorePair(first=CoreShare(**fields["first"]), second=CoreShare(**fields["second"]), busy=fields["busy"])


def _perf_profile(fields: dict[str, Any]) -> PerfProfile:
    return PerfProfile(**{**fields, "by_binary": [tuple(pair) for pair in fields["by_binary"]],
                          "top_functions": [tuple(row) for row in fields["top_functions"]]})


def _profile(fields: dict[str, Any]) -> Profile:
    return Profile(**{
        **fields,
        "self_counts": Counter(fields["self_counts"]),
        "total_counts": Counter(fields["total_counts"]),
        "thread_samples": Counter(fields["thread_samples"]),
        "thread_top_frame": {thread: (frame, count) for thread, (frame, count) in fields["thread_top_frame"].items()},
    })
