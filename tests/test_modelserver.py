"""Tests for modelserver: training, the HTTP contract of both model servers, and a real server process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_a import model as model_a
from model_b import model as model_b
from modelserver.artifact import (
    Artifact,
    ArtifactInvalidError,
    ArtifactNotFoundError,
    estimator_version,
    load_artifact,
)
from modelserver.server import EXECUTOR_MIN_ROWS, create_app
from modelserver.spec import ModelSpec
from modelserver.train import DEFAULT_SEED, HOLDOUT_FILE, load_split, train_all, train_model
from tests.processes import free_port
from modelserver.validation import parse_instances

SPECS: Final[tuple[ModelSpec, ...]] = (model_a, model_b)
MAX_BATCH: Final = 400
REPO_ROOT: Final = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_SECONDS: Final = 30.0

AnyClient = TestClient[Any, Any]


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train both models once per session into a temporary directory."""
    directory = tmp_path_factory.mktemp("artifacts")
    train_all(directory, seed=DEFAULT_SEED)
    return directory


@pytest.fixture(scope="session")
def holdout(artifacts_dir: Path) -> dict[str, Any]:
    """The held-out rows written by training."""
    return dict(json.loads((artifacts_dir / HOLDOUT_FILE).read_text()))


@pytest.fixture(scope="session")
def loaded(artifacts_dir: Path) -> dict[str, Artifact]:
    """Both artifacts, loaded once per session."""
    return {spec.NAME: load_artifact(artifacts_dir, spec.NAME) for spec in SPECS}


@pytest.fixture(params=SPECS, ids=[spec.NAME for spec in SPECS])
def spec(request: pytest.FixtureRequest) -> ModelSpec:
    """Each model package in turn."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def artifact(spec: ModelSpec, loaded: dict[str, Artifact]) -> Artifact:
    """The loaded artifact of the current model."""
    return loaded[spec.NAME]


@pytest.fixture
async def client(aiohttp_client: Any, spec: ModelSpec, artifact: Artifact) -> AnyClient:
    """A test client on the real app of the current model, with a small batch limit."""
    return await aiohttp_client(create_app(spec, artifact, max_batch=MAX_BATCH))  # type: ignore[no-any-return]


def metric_value(text: str, sample_name: str, labels: Mapping[str, str]) -> float:
    """Return the value of one sample in Prometheus exposition text, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return 0.0


# Training and artifacts


def test_holdout_file_has_exactly_the_replay_keys(holdout: dict[str, Any], loaded: dict[str, Artifact]) -> None:
    assert set(holdout) == {"dataset", "seed", "feature_names", "X", "y"}
    assert holdout["dataset"] == "breast_cancer" and holdout["seed"] == DEFAULT_SEED
    assert len(holdout["feature_names"]) == 30
    assert len(holdout["X"]) == len(holdout["y"]) == loaded["model_a"].metadata["metrics"]["n_holdout"]
    assert {len(row) for row in holdout["X"]} == {30}
    assert set(holdout["y"]) == {0, 1}


def test_artifact_metadata_is_complete(spec: ModelSpec, artifact: Artifact, holdout: dict[str, Any]) -> None:
    metadata = artifact.metadata
    assert metadata["name"] == spec.NAME
    assert re.fullmatch(r"[0-9a-f]{12}", metadata["version"])
    assert metadata["feature_names"] == holdout["feature_names"] and metadata["n_features"] == 30
    assert metadata["dataset"] == "breast_cancer" and metadata["seed"] == DEFAULT_SEED
    assert metadata["library"] in {"scikit-learn", "lightgbm"} and metadata["library_version"]
    assert metadata["trained_at"].endswith("+00:00")
    metrics = metadata["metrics"]
    assert set(metrics) == {"accuracy", "log_loss", "roc_auc", "n_holdout"}
    assert metrics["accuracy"] > 0.9 and metrics["roc_auc"] > 0.95 and 0 < metrics["log_loss"] < 0.5


def test_training_is_deterministic(spec: ModelSpec, artifact: Artifact) -> None:
    estimator, metadata = train_model(spec, load_split(DEFAULT_SEED), DEFAULT_SEED)
    assert metadata["version"] == estimator_version(estimator) == artifact.version
    assert metadata["metrics"] == artifact.metadata["metrics"]


def test_missing_artifact_names_path_and_make_train(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError) as caught:
        load_artifact(tmp_path, "model_a")
    assert str(tmp_path / "model_a.joblib") in str(caught.value) and "make train" in str(caught.value)


def test_artifact_of_another_model_is_rejected(artifacts_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model_b.joblib").write_bytes((artifacts_dir / "model_a.joblib").read_bytes())
    with pytest.raises(ArtifactInvalidError, match="holds model 'model_a', expected 'model_b'"):
        load_artifact(tmp_path, "model_b")


def test_parse_instances_accepts_integers_as_float64() -> None:
    matrix = parse_instances({"instances": [[1, 2.5], [3, 4]]}, n_features=2, max_batch=10)
    assert matrix.dtype == np.float64 and matrix.tolist() == [[1.0, 2.5], [3.0, 4.0]]


def test_create_app_rejects_non_positive_max_batch(spec: ModelSpec, artifact: Artifact) -> None:
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        create_app(spec, artifact, max_batch=0)


# HTTP: predictions


async def test_predict_single_row(client: AnyClient, spec: ModelSpec, artifact: Artifact, holdout: dict[str, Any]) -> None:
    response = await client.post("/predict", json={"instances": holdout["X"][:1]})
    assert response.status == 200
    assert response.headers["X-Model"] == spec.NAME and response.headers["X-Model-Version"] == artifact.version
    body = await response.json()
    assert set(body) == {"predictions", "probabilities", "model", "version"}
    assert body["model"] == spec.NAME and body["version"] == artifact.version
    assert len(body["predictions"]) == len(body["probabilities"]) == 1
    assert body["predictions"][0] in (0, 1) and 0.0 <= body["probabilities"][0] <= 1.0


@pytest.mark.parametrize("n_rows", [2, 171, EXECUTOR_MIN_ROWS + 10], ids=["small", "holdout", "executor"])
async def test_batch_predictions_equal_the_estimators_own(
    client: AnyClient, artifact: Artifact, holdout: dict[str, Any], n_rows: int
) -> None:
    rows = (holdout["X"] * 2)[:n_rows]
    response = await client.post("/predict", json={"instances": rows})
    assert response.status == 200
    body = await response.json()
    matrix = np.array(rows)
    assert body["predictions"] == artifact.model.predict(matrix).tolist()
    np.testing.assert_allclose(body["probabilities"], artifact.model.predict_proba(matrix)[:, 1], rtol=1e-12)


async def test_served_accuracy_equals_recorded_accuracy(
    client: AnyClient, artifact: Artifact, holdout: dict[str, Any]
) -> None:
    response = await client.post("/predict", json={"instances": holdout["X"]})
    predictions = np.array((await response.json())["predictions"])
    accuracy = float(np.mean(predictions == np.array(holdout["y"])))
    assert accuracy == artifact.metadata["metrics"]["accuracy"]


# HTTP: bad input

ROW: Final = [1.0] * 30


def _with(column: int, value: Any) -> list[Any]:
    """Return ROW with one value replaced."""
    row: list[Any] = list(ROW)
    row[column] = value
    return row


def _body(instances: Any) -> bytes:
    """Return a JSON body ``{"instances": instances}``."""
    return json.dumps({"instances": instances}).encode()


BAD_BODIES: Final = [
    ("invalid_json", b"{not json", ["not valid JSON"]),
    ("invalid_json", b"", ["not valid JSON"]),
    ("invalid_json", b"\xff\xfe\x00", ["not valid JSON"]),
    ("not_object", b"[[1.0, 2.0]]", ["must be a JSON object", "got array"]),
    ("missing_instances", b'{"rows": [[1.0]]}', ["lacks the field 'instances'"]),
    ("instances_not_list", b'{"instances": {"a": 1}}', ["'instances' must be a list of rows, got object"]),
    ("instances_not_list", b'{"instances": "1,2,3"}', ["'instances' must be a list of rows, got string"]),
    ("empty_batch", _body([]), ["'instances' is empty"]),
    ("batch_too_large", _body([ROW] * (MAX_BATCH + 1)), [f"{MAX_BATCH + 1} rows", f"limit of {MAX_BATCH}"]),
    ("row_not_list", _body(ROW), ["flat list of numbers", "[[f1, ..., f30]]"]),
    ("row_not_list", _body([ROW, "1.0"]), ["instances[1] must be a list of 30 numbers, got string"]),
    ("wrong_feature_count", _body([ROW, ROW[:29]]), ["instances[1] has 29 features, expected 30"]),
    ("wrong_feature_count", _body([ROW + [1.0]]), ["instances[0] has 31 features, expected 30"]),
    ("non_numeric", _body([ROW, _with(3, "1.5")]), ["instances[1][3] must be a number, got string"]),
    ("non_numeric", _body([_with(5, True)]), ["instances[0][5] must be a number, got boolean"]),
    ("non_numeric", _body([_with(0, None)]), ["instances[0][0] must be a number, got null"]),
    ("non_numeric", _body([_with(7, [1.0])]), ["instances[0][7] must be a number, got array"]),
    ("non_finite", _body([ROW, _with(2, float("nan"))]), ["instances[1][2] is nan", "NaN and infinity"]),
    ("non_finite", _body([_with(4, float("-inf"))]), ["instances[0][4] is -inf"]),
    ("non_finite", b'{"instances": [[1e400' + b", 1.0" * 29 + b"]]}", ["instances[0][0] is inf"]),
    ("non_finite", _body([_with(9, 10**400)]), ["instances[0][9]", "outside the float64 range"]),
    ("body_too_large", _body([ROW]).replace(b"]]", b"]]" + b" " * (2 * 1024**2)), ["body too large"]),
]


@pytest.mark.parametrize(
    ("reason", "body", "expected"), BAD_BODIES, ids=[f"{index}-{case[0]}" for index, case in enumerate(BAD_BODIES)]
)
async def test_bad_input_is_400_naming_the_problem(
    client: AnyClient, spec: ModelSpec, reason: str, body: bytes, expected: list[str]
) -> None:
    # A stream, not bytes: aiohttp warns about sending megabytes of raw bytes from the event loop.
    response = await client.post("/predict", data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert response.headers["X-Model"] == spec.NAME
    message = (await response.json())["error"]
    for fragment in expected:
        assert fragment in message
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "model_bad_requests_total", {"model": spec.NAME, "reason": reason}) == 1.0


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/predict", 405), ("POST", "/nowhere", 404)])
async def test_wrong_method_and_unknown_path_keep_aiohttp_defaults(
    client: AnyClient, spec: ModelSpec, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status == status and response.headers["X-Model"] == spec.NAME


# HTTP: health, info, metrics


async def test_health_readiness_and_info(client: AnyClient, spec: ModelSpec, artifact: Artifact) -> None:
    health = await client.get("/healthz")
    assert health.status == 200 and await health.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "model": spec.NAME, "version": artifact.version}
    info = await client.get("/info")
    assert info.status == 200 and await info.json() == json.loads(json.dumps(dict(artifact.metadata)))


async def test_metrics_count_predictions(client: AnyClient, spec: ModelSpec, holdout: dict[str, Any]) -> None:
    labels = {"model": spec.NAME}
    before = await (await client.get("/metrics")).text()
    assert metric_value(before, "model_predict_requests_total", labels) == 0.0
    for rows in (holdout["X"][:1], holdout["X"][:5]):
        assert (await client.post("/predict", json={"instances": rows})).status == 200
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    after = await response.text()
    assert metric_value(after, "model_predict_requests_total", labels) == 2.0
    assert metric_value(after, "model_predicted_rows_total", labels) == 6.0
    assert metric_value(after, "model_predict_latency_seconds_count", labels) == 2.0
    assert metric_value(after, "model_info", {"model": spec.NAME}) == 1.0


# Real processes


def _serve(model: str, *arguments: str) -> subprocess.Popen[str]:
    """Start ``python -m <model> ...`` with stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", model, *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _wait_until_ready(session: aiohttp.ClientSession, url: str, process: subprocess.Popen[str]) -> None:
    """Poll /readyz until it answers 200, failing if the process dies or time runs out."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early: {process.communicate()[1]}"
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"server at {url} not ready after {PROCESS_TIMEOUT_SECONDS} s")


async def test_real_process_serves_holdout_and_stops_on_sigterm(
    artifacts_dir: Path, holdout: dict[str, Any], loaded: dict[str, Artifact]
) -> None:
    port = free_port()
    process = _serve("model_a", "--port", str(port), "--artifacts", str(artifacts_dir))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_until_ready(session, url, process)
            async with session.post(f"{url}/predict", json={"instances": holdout["X"]}) as response:
                assert response.status == 200
                predictions = np.array((await response.json())["predictions"])
        accuracy = float(np.mean(predictions == np.array(holdout["y"])))
        assert accuracy == loaded["model_a"].metadata["metrics"]["accuracy"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=PROCESS_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"serving model_a version {loaded['model_a'].version} on http://127.0.0.1:{port}" in stderr


def test_missing_artifacts_exit_2_saying_make_train(tmp_path: Path) -> None:
    missing = tmp_path / "no-artifacts"
    process = _serve("model_b", "--port", str(free_port()), "--artifacts", str(missing))
    _, stderr = process.communicate(timeout=PROCESS_TIMEOUT_SECONDS)
    assert process.returncode == 2
    assert str(missing / "model_b.joblib") in stderr and "make train" in stderr
    assert len(stderr.strip().splitlines()) == 1
