"""Static checks of the container stack's files: docker-compose.yml, Dockerfiles, Prometheus and Grafana config.

No Docker needed: these catch a dashboard querying a metric nobody exports, a port
published beyond loopback or an image that needs a registry, before anything runs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest
import yaml

from balancer.config import load_experiment
from balancer.metrics import BalancerMetrics
from modelserver.metrics import create_metrics

REPO: Final = Path(__file__).resolve().parents[1]
COMPOSE: Final = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: Final[dict[str, Any]] = COMPOSE["services"]
DASHBOARD_DIR: Final = REPO / "compose" / "grafana" / "dashboards"
PROMETHEUS_CONFIG: Final = REPO / "compose" / "prometheus" / "prometheus.yml"
MODEL_PORTS: Final = {"model_a": 8001, "model_b": 8002}
PROMQL_WORDS: Final = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
})


def load_script(name: str) -> ModuleType:
    """Import a file of scripts/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def exported_series_names() -> set[str]:
    """Every sample name the balancer and a model server expose on /metrics (with _total, _bucket, ...)."""
    registries = [BalancerMetrics().registry, create_metrics(model="model_a", version="test").registry]
    balancer = BalancerMetrics()
    # Label children appear in the exposition only once used; create one of each.
    balancer.children("experiment", "variant").observe(200, 0.01)
    balancer.upstream_errors.labels("variant", "upstream", "reason").inc()
    registries.append(balancer.registry)
    names = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    return names


def promql_metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or Grafana variables)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expression)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, $__rate_interval
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        if match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(file, panel title, expr) of every query in every provisioned dashboard."""
    found = []
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((path.name, panel["title"], target["expr"]))
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query", "")
            label_values = re.match(r"label_values\((\w+),", query or "")
            if label_values:
                found.append((path.name, f"variable {variable['name']}", label_values.group(1)))
    return found


# --- docker-compose.yml


def test_published_ports_are_loopback_only() -> None:
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"services.{name}.ports: {mapping!r} is not on 127.0.0.1"
    for model in MODEL_PORTS:
        assert "ports" not in SERVICES[model], f"{model} must be reached through the balancer only"


def test_default_profile_needs_no_registry() -> None:
    """Every service started by a plain `up` is built locally; registry images sit behind a profile."""
    for name, service in SERVICES.items():
        if "profiles" in service:
            continue
        assert "build" in service and service["image"].startswith("ab-balancer/"), (
            f"services.{name} ({service.get('image')}) would be pulled from a registry by a plain `up`"
        )
    assert SERVICES["grafana"]["profiles"] == ["grafana"]
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", SERVICES["grafana"]["image"]), "pin Grafana's version"


def test_balancer_mounts_the_experiment_directory_and_a_data_volume() -> None:
    volumes = SERVICES["balancer"]["volumes"]
    assert "./experiments:/app/experiments:ro" in volumes
    assert "outcomes:/data" in volumes and "outcomes" in COMPOSE["volumes"]
    assert "BALANCER_ADMIN_TOKEN" in SERVICES["balancer"]["environment"]


def test_compose_experiment_is_valid_and_points_at_the_model_services() -> None:
    loaded = load_experiment(REPO / "experiments" / "compose.yaml")
    experiment = loaded.experiment
    assert experiment.name == "breast-cancer-lr-vs-lgbm"
    assert experiment.weights == {"model_a": 50, "model_b": 50}
    for variant in experiment.variants:
        assert [str(upstream) for upstream in variant.upstreams] == [
            f"http://{variant.name}:{MODEL_PORTS[variant.name]}"
        ]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) not installed")
def test_docker_compose_v1_accepts_the_file() -> None:
    for extra in ([], ["--profile", "grafana"]):
        result = subprocess.run(["docker-compose", *extra, "config", "--quiet"], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


# --- Dockerfiles and image builds


def test_every_built_service_has_a_dockerfile_in_the_repo() -> None:
    builds = load_script("build_images").image_builds(REPO / "docker-compose.yml")
    assert {build.service for build in builds} == {"balancer", "model_a", "model_b", "prometheus"}
    for build in builds:
        assert build.dockerfile.is_file(), build
        assert build.context == REPO, f"{build.service}: build context must be the repo root"
        command = load_script("build_images").build_command(build)
        assert command[:4] == ["docker", "build", "--network", "host"]


@pytest.mark.parametrize("service", ["balancer", "model_a", "model_b", "prometheus"])
def test_dockerfile_is_air_gapped_unprivileged_and_health_checked(service: str) -> None:
    dockerfile = (REPO / SERVICES[service]["build"]["dockerfile"]).read_text()
    # The only image pulled is the base the project can build locally; other stages start from earlier ones.
    stages: list[str] = []
    for base, name in re.findall(r"^FROM (\S+)(?: AS (\S+))?$", dockerfile, re.MULTILINE):
        assert base == "python:3.11-slim" or base in stages, f"{service}: FROM {base} is neither the base nor a stage"
        stages.append(name)
    assert stages, f"{service}: no FROM line"
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), f"{service} must run as a non-root user"
    assert "HEALTHCHECK" in dockerfile and ("/healthz" in dockerfile or "/-/ready" in dockerfile)


@pytest.mark.parametrize("service", ["balancer", "model_a", "model_b"])
def test_dockerfile_installs_pins_from_pyproject(service: str) -> None:
    dockerfile = (REPO / SERVICES[service]["build"]["dockerfile"]).read_text()
    pins = load_script("pins")
    match = re.search(r"pins\.py [^)]*?--(exclude|only)((?:\s+\\?\s*[A-Za-z][\w.-]*)+)", dockerfile)
    assert match, f"{service}: dependencies must come from scripts/pins.py (pyproject.toml holds the pins)"
    names = match.group(2).replace("\\", " ").split()
    selected = pins.select(pins.read_pins(REPO / "pyproject.toml"), only=[] if match.group(1) == "exclude" else names,
                           exclude=names if match.group(1) == "exclude" else [])
    assert all("==" in requirement for requirement in selected)
    if service.startswith("model_"):
        assert any(requirement.startswith("lightgbm==") for requirement in selected)
        assert any(requirement.startswith("scikit-learn==") for requirement in selected)
        assert "--out /app/artifacts" in dockerfile and "modelserver.train" in dockerfile
    else:
        assert not any(requirement.startswith(("lightgbm==", "scikit-learn==")) for requirement in selected)
        assert any(requirement.startswith("statsmodels==") for requirement in selected)


def test_model_dockerfiles_share_every_layer_up_to_training() -> None:
    """Identical instructions up to the training step: the two images share those layers."""
    def layers(service: str) -> list[str]:
        text = (REPO / service / "Dockerfile").read_text()
        instructions = re.sub(r"\\\n", " ", re.sub(r"^#.*\n", "", text, flags=re.MULTILINE)).splitlines()
        return [line for line in instructions if line.strip()]

    a, b = layers("model_a"), layers("model_b")
    train = next(index for index, line in enumerate(a) if "modelserver.train" in line)
    assert a[: train + 1] == b[: train + 1]


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "artifacts"} <= ignored


# --- Prometheus


def test_prometheus_discovers_every_replica_by_dns() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {"balancer": 8081, **MODEL_PORTS}
    for job_name, port in expected.items():
        (discovery,) = jobs[job_name]["dns_sd_configs"]
        assert discovery == {**discovery, "names": [job_name], "type": "A", "port": port}
        assert jobs[job_name].get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana


def test_grafana_datasource_uid_matches_the_dashboards() -> None:
    provisioning = REPO / "compose" / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ab-balancer.yml").read_text())["providers"]
    assert provider["options"]["path"] in SERVICES["grafana"]["volumes"][1]
    for path in DASHBOARD_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        uids = {json.dumps(panel.get("datasource")) for panel in dashboard["panels"] if panel["type"] != "row"}
        assert uids == {json.dumps({"type": "prometheus", "uid": datasource["uid"]})}, path.name
        panel_ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), f"{path.name}: duplicate panel ids"


def test_dashboard_covers_split_errors_and_latency_quantiles() -> None:
    expressions = " ".join(expr for _, _, expr in dashboard_expressions())
    assert "balancer_requests_total" in expressions and "group_left" in expressions  # traffic split
    assert 'status_class="5xx"' in expressions  # error rate
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (variant, le)" in expressions


@pytest.mark.parametrize(("file", "panel", "expression"), dashboard_expressions())
def test_dashboard_queries_only_metrics_the_code_exports(file: str, panel: str, expression: str) -> None:
    names = promql_metric_names(expression)
    assert names, f"{file} / {panel}: no metric in {expression!r}"
    unknown = names - exported_series_names()
    assert not unknown, f"{file} / {panel}: {sorted(unknown)} not exported by the balancer or model servers"


def test_promql_metric_name_extraction() -> None:
    expression = (
        'sum by (variant) (rate(balancer_requests_total{experiment=~"$experiment",status_class="5xx"}'
        "[$__rate_interval])) / ignoring(variant) group_left sum(rate(balancer_requests_total[5m]))"
        " + on(job) histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m]))) > bool 0"
    )
    assert promql_metric_names(expression) == {"balancer_requests_total", "x_bucket"}
