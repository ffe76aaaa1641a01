"""Variant assignment: pure functions from (unit, experiment) to a variant. No I/O.

The bucket space has 10,000 buckets. A sticky unit is hashed into one bucket with a
salt made of the experiment's name and seed, so the same user lands on the same
variant across restarts and across balancer instances, with no shared state.

Variants own contiguous bucket ranges laid out in the YAML's order, with exact
counts (largest-remainder rounding), so a 50/50 split is exactly 5,000/5,000 buckets
and never fails a sample-ratio check by construction. With two variants any weight
change moves only the users in the difference of the two layouts: raising the
challenger only moves users into it, lowering it moves the fewest possible out.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from balancer.config import Experiment

BUCKETS: Final = 10_000
STICKY_CACHE_SIZE: Final = 100_000  # unit ids remembered per config version (~10 MB at most)


def bucket_of(unit_id: str, salt: str) -> int:
    """The bucket (0..9,999) of a unit id, stable across processes and machines."""
    digest = hashlib.blake2b(f"{salt}\x00{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket_counts(weights: Sequence[float]) -> tuple[int, ...]:
    """How many of the 10,000 buckets each weight gets: proportional, exact, summing to 10,000."""
    total = float(sum(weights))
    if total <= 0 or any(weight < 0 for weight in weights):
        raise ValueError(f"weights must be >= 0 and not all zero, got {list(weights)}")
    exact = [BUCKETS * weight / total for weight in weights]
    counts = [int(share) for share in exact]
    # Hand the leftover buckets to the largest remainders, ties to the earlier variant.
    leftovers = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for index in leftovers[: BUCKETS - sum(counts)]:
        counts[index] += 1
    return tuple(counts)


def bucket_table(weights: Sequence[float]) -> tuple[int, ...]:
    """Variant index of every bucket: contiguous ranges in the given order."""
    table: list[int] = []
    for index, count in enumerate(bucket_counts(weights)):
        table.extend([index] * count)
    return tuple(table)


def salt_of(experiment: Experiment) -> str:
    """The hashing salt: experiment name and seed, so experiments bucket independently."""
    return f"{experiment.name}:{experiment.seed}"


@dataclass(frozen=True)
class Assigner:
    """Chooses a variant per request for one config version."""

    names: tuple[str, ...]
    table: tuple[int, ...]
    salt: str
    sticky: bool
    override: str | None  # when paused/stopped, everyone goes here
    override_kind: str
    rng: random.Random = field(compare=False)
    sticky_cache: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    sticky_cache_size: int = field(default=STICKY_CACHE_SIZE, compare=False, repr=False)

    @classmethod
    def for_experiment(cls, experiment: Experiment) -> Assigner:
        """Build the assigner (bucket table, salt, seeded RNG) for an experiment."""
        override, override_kind = None, ""
        if experiment.status == "paused":
            override, override_kind = experiment.control_name, "paused"
        elif experiment.status == "stopped":
            override, override_kind = experiment.winner, "winner"
        return cls(
            names=tuple(variant.name for variant in experiment.variants),
            table=bucket_table([variant.weight for variant in experiment.variants]),
            salt=salt_of(experiment),
            sticky=experiment.strategy == "sticky",
            override=override,
            override_kind=override_kind,
            rng=random.Random(experiment.seed),
        )

    def choose(self, unit_id: str | None) -> tuple[str, str]:
        """(variant, how it was assigned) for a request whose unit key is `unit_id` (None if absent)."""
        if self.override is not None:
            return self.override, self.override_kind
        if self.sticky:
            if unit_id:
                # Users come back: remembering their variant skips the hash (a third of the
                # assignment's cost on the proxy's hot path). One cache per config version.
                variant = self.sticky_cache.get(unit_id)
                if variant is None:
                    variant = self.names[self.table[bucket_of(unit_id, self.salt)]]
                    if len(self.sticky_cache) >= self.sticky_cache_size:
                        self.sticky_cache.clear()
                    self.sticky_cache[unit_id] = variant
                return variant, "sticky"
            return self.names[self.table[self.rng.randrange(BUCKETS)]], "random_no_key"
        return self.names[self.table[self.rng.randrange(BUCKETS)]], "random"


def choose_variant(unit_id: str, experiment: Experiment) -> str:
    """The sticky variant of `unit_id` under `experiment`'s current weights (ignores status)."""
    table = bucket_table([variant.weight for variant in experiment.variants])
    return experiment.variants[table[bucket_of(unit_id, salt_of(experiment))]].name
