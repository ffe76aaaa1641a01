"""Assignment: golden values, exact bucket counts, determinism, monotone ramps."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter

import pytest
from scipy.stats import binomtest

from balancer.assignment import BUCKETS, Assigner, bucket_counts, bucket_of, bucket_table, choose_variant, salt_of
from balancer.config import Experiment, parse_experiment


def make_experiment(weights: list[float], **extra: object) -> Experiment:
    variants = [{"name": f"v{i}", "weight": w, "upstreams": [f"http://127.0.0.1:{9000 + i}"]} for i, w in enumerate(weights)]
    return Experiment.model_validate({"name": "exp", "seed": 42, "variants": variants, **extra})


@pytest.fixture(scope="module")
def default_experiment() -> Experiment:
    with open("experiments/default.yaml", encoding="utf-8") as handle:
        return parse_experiment(handle.read()).experiment


@pytest.mark.parametrize(
    ("unit", "bucket", "variant"),
    [
        ("user-1", 2895, "model_a"), ("user-2", 3094, "model_a"), ("alice", 1059, "model_a"),
        ("user-8", 4848, "model_a"), ("dave", 5051, "model_b"), ("user-9", 9330, "model_b"),
        ("user-10", 9892, "model_b"), ("carol", 8988, "model_b"),
    ],
)
def test_golden_assignments(default_experiment: Experiment, unit: str, bucket: int, variant: str) -> None:
    assert salt_of(default_experiment) == "breast-cancer-lr-vs-lgbm:42"
    assert bucket_of(unit, salt_of(default_experiment)) == bucket
    assert choose_variant(unit, default_experiment) == variant


@pytest.mark.parametrize(
    ("weights", "counts"),
    [
        ([50, 50], (5000, 5000)), ([1, 1, 1], (3334, 3333, 3333)), ([10, 90], (1000, 9000)),
        ([0.3, 0.3, 0.4], (3000, 3000, 4000)), ([2, 0, 1], (6667, 0, 3333)), ([1, 0], (10000, 0)),
    ],
)
def test_bucket_counts_are_exact(weights: list[float], counts: tuple[int, ...]) -> None:
    assert bucket_counts(weights) == counts
    assert sum(counts) == BUCKETS


@pytest.mark.parametrize("weights", [[0, 0], [-1, 2], []])
def test_bucket_counts_reject_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights"):
        bucket_counts(weights)


def test_buckets_are_uniform() -> None:
    counts = Counter(bucket_of(f"user-{i}", "salt") // 1000 for i in range(50_000))
    # each tenth of the bucket space gets its binomial share
    for decile in range(10):
        assert binomtest(counts[decile], 50_000, 0.1).pvalue > 1e-4


def test_salt_separates_experiments() -> None:
    same = sum(bucket_of(f"u{i}", "a:1") == bucket_of(f"u{i}", "b:1") for i in range(2000))
    assert same < 10


def test_sticky_is_deterministic_and_random_is_seeded() -> None:
    experiment = make_experiment([30, 70], strategy="random")
    first = Assigner.for_experiment(experiment)
    second = Assigner.for_experiment(experiment)
    assert [first.choose(None) for _ in range(200)] == [second.choose(None) for _ in range(200)]
    sticky = Assigner.for_experiment(make_experiment([30, 70]))
    assert all(sticky.choose("u1") == sticky.choose("u1") for _ in range(10))
    assert sticky.choose("u1")[1] == "sticky"
    assert sticky.choose(None)[1] == "random_no_key"
    assert first.choose(None)[1] == "random"


def test_random_split_matches_weights() -> None:
    assigner = Assigner.for_experiment(make_experiment([20, 80], strategy="random"))
    chosen = Counter(assigner.choose(None)[0] for _ in range(20_000))
    assert binomtest(chosen["v0"], 20_000, 0.2).pvalue > 1e-3


def test_paused_sends_everyone_to_control_and_stopped_to_winner() -> None:
    paused = Assigner.for_experiment(make_experiment([50, 50], status="paused", control="v1"))
    assert {paused.choose(f"u{i}") for i in range(50)} == {("v1", "paused")}
    stopped = Assigner.for_experiment(make_experiment([50, 50], status="stopped", winner="v0"))
    assert {stopped.choose(f"u{i}") for i in range(50)} == {("v0", "winner")}


def test_zero_weight_variant_gets_nobody() -> None:
    experiment = make_experiment([1, 0, 1])
    assert all(choose_variant(f"u{i}", experiment) != "v1" for i in range(5000))


def test_ramp_only_moves_users_into_the_ramped_variant_and_moves_the_minimum() -> None:
    """10% -> 20% -> 50% for 10,000 users: nobody leaves the challenger; moves equal the minimum."""
    users = [f"user-{i}" for i in range(10_000)]
    salt = "exp:42"
    buckets = [bucket_of(user, salt) for user in users]
    previous: list[int] | None = None
    previous_table: tuple[int, ...] = ()
    previous_challenger = 0
    for challenger in (10, 20, 50):
        table = bucket_table([100 - challenger, challenger])
        assignment = [table[bucket] for bucket in buckets]
        if previous is not None:
            moved = [i for i, (before, after) in enumerate(zip(previous, assignment, strict=True)) if before != after]
            assert all(previous[i] == 0 and assignment[i] == 1 for i in moved), "someone left the challenger"
            # the minimum possible: exactly the users whose buckets changed owner
            changed_buckets = sum(1 for b in range(BUCKETS) if table[b] != previous_table[b])
            expected = sum(1 for bucket in buckets if table[bucket] != previous_table[bucket])
            assert len(moved) == expected
            assert changed_buckets == (challenger - previous_challenger) * BUCKETS // 100
        previous, previous_table, previous_challenger = assignment, table, challenger


def test_lowering_a_weight_moves_only_users_out_of_it() -> None:
    high, low = bucket_table([50, 50]), bucket_table([80, 20])
    changed = [b for b in range(BUCKETS) if high[b] != low[b]]
    assert len(changed) == 3000
    assert all(high[b] == 1 and low[b] == 0 for b in changed)


def test_assignment_is_stable_across_processes() -> None:
    """Another interpreter with another hash seed computes the same buckets."""
    code = "from balancer.assignment import bucket_of; print([bucket_of(f'u{i}', 's') for i in range(50)])"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outputs == {str([bucket_of(f"u{i}", "s") for i in range(50)]) + "\n"}


def test_the_sticky_cache_gives_the_hashed_answer_and_stays_bounded() -> None:
    experiment = make_experiment([30, 70])
    assigner = dataclasses.replace(Assigner.for_experiment(experiment), sticky_cache_size=50)
    for _ in range(3):
        for i in range(120):
            assert assigner.choose(f"u{i}") == (choose_variant(f"u{i}", experiment), "sticky")
    assert len(assigner.sticky_cache) <= 50
