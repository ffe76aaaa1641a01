"""The report's account of what outcome logging + metrics cost, from the same-core pairs (`bench/same_core.py`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from bench.runs import Settings
from bench.same_core import SameCorePair

SAME_CORE_HOW = "both on one core at once, CPU per request"
WRITER_SPARED_HOW = "the same runs, the store writer on a core of its own"
# feature configuration label -> what it has on, in the same-core section
FEATURES_ALONE = {"metrics off": "the outcome log alone", "outcomes off": "metrics alone"}


def same_core_costs(pairs: Sequence[SameCorePair]) -> list[float]:
    """Each pair's throughput cost of the first configuration against the second, in %."""
    return [100 * pair.cost for pair in pairs]


def without_writer_costs(pairs: Sequence[SameCorePair]) -> list[float]:
    """The same with the first configuration's store writer left out: a machine with a core to spare for it."""
    return [100 * (1 - pair.second.us_per_request / (pair.first.us_per_request - pair.first.writer_us_per_request))
            for pair in pairs]


def same_core_paragraph(same_core: Mapping[str, Sequence[SameCorePair]], settings: Settings,
                        interval: tuple[float, float] | None) -> str:
    """The logging-cost paragraphs of the feature section."""
    pairs = same_core["default"]
    costs = sorted(same_core_costs(pairs))
    median = statistics.median(costs)
    first_us = statistics.median(pair.first.us_per_request for pair in pairs)
    second_us = statistics.median(pair.second.us_per_request for pair in pairs)
    writer_us = statistics.median(pair.first.writer_us_per_request for pair in pairs)
    busy = statistics.median(pair.busy for pair in pairs)
    bounds = "" if interval is None else f"; 90 % interval of the median {interval[0]:.1f} to {interval[1]:.1f} %"
    text = (
        f"\n**Outcome logging + metrics cost {median:.1f} % of throughput** (target < 10 %{bounds}), measured with "
        f"both configurations at once on one core (`bench/same_core.py`; `python -m bench.same_core` repeats it, "
        f"`--first default --second default` gives the method's A/A spread): the default balancer and the one with "
        f"outcomes and metrics off, their store writers included, pinned to one CPU; the backends and two wrk, one per "
        f"balancer with {max(1, settings.connections // 2)} connections, on the other. {len(pairs)} runs of "
        f"{settings.same_core_s:g} s; the shared CPU was {100 * busy:.0f} % busy (median). A balancer on a saturated "
        f"core serves requests at the rate its CPU per request allows, so each run gives the cost as 1 − (the lean "
        f"balancer's CPU per request ÷ the default's): {second_us:.1f} against {first_us:.1f} µs (medians). Whatever "
        f"slows that CPU down slows both alike, so the runs agree to within {costs[-1] - costs[0]:.1f} points "
        f"({costs[0]:.1f} % to {costs[-1]:.1f} %), against the tens of per cent one balancer's saturation rounds "
        f"range over (the min–max column above).\n"
        f"\nThe default's store writer ran {writer_us:.1f} µs per request, counted here as if it had to share the "
        f"balancer's core; on a machine with a core to spare for it the same runs give "
        f"{statistics.median(without_writer_costs(pairs)):.1f} %.")
    alone = [f"{what} {statistics.median(same_core_costs(same_core[label])):.1f} % "
             f"({len(same_core[label])} runs, {min(same_core_costs(same_core[label])):.1f} % to "
             f"{max(same_core_costs(same_core[label])):.1f} %)"
             for label, what in FEATURES_ALONE.items() if same_core.get(label)]
    if alone:
        text += " Each feature alone, measured the same way against the same lean balancer: " + "; ".join(alone) + "."
    return text + "\n"
