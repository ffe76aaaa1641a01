"""Config validation: every error names file, line, key and value."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from balancer import config
from balancer.config import ConfigError, available_cpus, load_experiment, parse_experiment

VALID = """\
name: exp
strategy: sticky
sticky_key: header:X-User-ID
seed: 42
variants:
  - name: model_a
    weight: 50
    upstreams: ["http://127.0.0.1:8001"]
  - name: model_b
    weight: 50
    upstreams: ["http://127.0.0.1:8002"]
"""


def test_valid_file_loads_with_defaults() -> None:
    loaded = parse_experiment(VALID, source="exp.yaml")
    experiment = loaded.experiment
    assert experiment.control_name == "model_a"
    assert experiment.weights == {"model_a": 50.0, "model_b": 50.0}
    assert experiment.sticky_source == ("header", "X-User-ID")
    assert len(loaded.hash) == 16
    assert experiment.analysis.alpha == 0.05


def test_shipped_experiments_are_valid() -> None:
    for path in Path("experiments").glob("*.yaml"):
        load_experiment(path)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("weight: 50\n    upstreams: [\"http://127.0.0.1:8002\"]", "weight: -5\n    upstreams: [\"http://127.0.0.1:8002\"]",
         "exp.yaml:10: variants[1].weight = -5: Input should be greater than or equal to 0"),
        ("strategy: sticky", "strategy: roundrobin", "exp.yaml:2: strategy = 'roundrobin'"),
        ("sticky_key: header:X-User-ID", "sticky_key: query:user", "exp.yaml:3: sticky_key = 'query:user': 'query:user' must be header:NAME"),
        ("- name: model_b", "- name: model_a", "variant names must be unique, ['model_a'] repeated"),
        ('["http://127.0.0.1:8002"]', '["ftp://x"]', "exp.yaml:11: variants[1].upstreams = ['ftp://x']: 'ftp://x' is not an http://host[:port] URL"),
        ('["http://127.0.0.1:8002"]', "[]", "exp.yaml:11: variants[1].upstreams = []: Tuple should have at least 1 item"),
        ("seed: 42", "seed: 42\ncolour: red", "exp.yaml:5: unknown key 'colour'"),
        ("name: exp\n", "", "missing required key 'name'"),
        ("weight: 50\n    upstreams: [\"http://127.0.0.1:8001\"]", "weight: 0\n    upstreams: [\"http://127.0.0.1:8001\"]", None),
        ("seed: 42", "seed: 42\nstatus: stopped", "status = 'stopped' needs winner: NAME"),
        ("seed: 42", "seed: 42\ncontrol: model_c", "control = 'model_c' is not one of the variants"),
        ("seed: 42", "seed: 42\nupstream: {try_timeout_s: 10, total_timeout_s: 5}", "total_timeout_s = 5.0 must be >= try_timeout_s = 10.0"),
        ("seed: 42", "seed: 42\nanalysis: {alpha: 2}", "analysis.alpha = 2: Input should be less than 0.5"),
        ("weight: 50\n    upstreams: [\"http://127.0.0.1:8002\"]", "weight: .nan\n    upstreams: [\"http://127.0.0.1:8002\"]", "variants[1].weight = nan"),
        ("seed: 42", "seed: 42\nserver: {workers: many}",
         "exp.yaml:5: server.workers = 'many': must be a whole number from 1 to 64, or \"auto\" (one per CPU)"),
        ("seed: 42", "seed: 42\nserver: {workers: 0}", "server.workers = 0: Input should be greater than or equal to 1"),
    ],
)
def test_errors_name_file_line_key_and_value(old: str, new: str, expected: str | None) -> None:
    assert old in VALID
    body = VALID.replace(old, new, 1)
    if expected is None:
        parse_experiment(body, source="exp.yaml")
        return
    with pytest.raises(ConfigError) as error:
        parse_experiment(body, source="exp.yaml")
    assert expected in str(error.value)


def test_all_weights_zero_is_rejected() -> None:
    body = VALID.replace("weight: 50", "weight: 0")
    with pytest.raises(ConfigError, match="at least one variant needs a weight > 0"):
        parse_experiment(body, source="exp.yaml")


def test_one_variant_is_rejected() -> None:
    body = VALID.split("  - name: model_b")[0]
    with pytest.raises(ConfigError, match="variants = .*at least 2 items"):
        parse_experiment(body, source="exp.yaml")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: [unclosed", "exp.yaml:1: invalid YAML: expected ',' or ']'"),
        ("- just\n- a list\n", "exp.yaml: the file must be a mapping of keys, got list"),
        ("", "exp.yaml: the file must be a mapping of keys, got NoneType"),
        ("name: a\n\tbad: tab\n", "exp.yaml:2: invalid YAML"),
    ],
)
def test_yaml_errors_name_file_and_line(body: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_experiment(body, source="exp.yaml")
    assert expected in str(error.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read experiment file"):
        load_experiment(tmp_path / "nope.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="bin.yaml: not UTF-8"):
        load_experiment(binary)


def test_a_failing_item_does_not_also_report_its_list_as_short() -> None:
    body = VALID.replace('["http://127.0.0.1:8002"]', "[]")
    with pytest.raises(ConfigError) as error:
        parse_experiment(body, source="exp.yaml")
    assert str(error.value).count("\n") == 0


def test_workers_auto_is_one_per_cpu_the_balancer_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "available_cpus", lambda: 3)
    loaded = parse_experiment(VALID + "server: {workers: auto}\n", source="exp.yaml")
    assert loaded.experiment.server.workers == 3
    assert parse_experiment(VALID + "server: {workers: Auto}\n", source="exp.yaml").experiment.server.workers == 3
    monkeypatch.setattr(config, "available_cpus", lambda: 500)
    assert parse_experiment(VALID + "server: {workers: auto}\n", source="exp.yaml").experiment.server.workers == 64


def _cgroups(tmp_path: Path, membership: str, limits: dict[str, str]) -> tuple[Path, Path]:
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(membership)
    for folder, limit in limits.items():
        (cgroups / folder).mkdir(parents=True, exist_ok=True)
        (cgroups / folder / "cpu.max").write_text(limit)
    return proc, cgroups


def test_available_cpus_take_the_lowest_cpu_quota_above_the_process(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    # a service limited to 2.5 CPUs inside a slice limited to 6: 3 (rounded up)
    proc, cgroups = _cgroups(tmp_path, "0::/system.slice/app.service\n",
                             {"system.slice": "600000 100000\n", "system.slice/app.service": "250000 100000\n"})
    assert available_cpus(proc, cgroups) == 3
    # no quota anywhere ("max"): the affinity mask
    proc, cgroups = _cgroups(tmp_path / "b", "0::/user.slice\n", {"user.slice": "max 100000\n"})
    assert available_cpus(proc, cgroups) == 8
    # a container: its own cgroup is "/", with a quota of half a CPU: 1
    proc, cgroups = _cgroups(tmp_path / "c", "0::/\n", {"": "50000 100000\n"})
    assert available_cpus(proc, cgroups) == 1
    # cgroup v1 only (no "0::" line), or no /proc: the affinity mask
    proc, cgroups = _cgroups(tmp_path / "d", "4:cpu,cpuacct:/x\n", {})
    assert available_cpus(proc, cgroups) == 8
    assert available_cpus(tmp_path / "nowhere", cgroups) == 8
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {1})
    assert available_cpus(proc, cgroups) == 1


def test_available_cpus_on_this_machine_are_within_its_cpu_count() -> None:
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_the_workers_flag_takes_a_number_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from balancer.__main__ import _workers

    monkeypatch.setattr(config, "available_cpus", lambda: 5)
    assert (_workers("auto"), _workers("AUTO"), _workers("2"), _workers("0")) == (5, 5, 2, 0)  # 0: refused at start
    with pytest.raises(argparse.ArgumentTypeError, match="'two': a whole number, or auto"):
        _workers("two")
