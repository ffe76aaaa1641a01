"""The HTTP shell around one model artifact: /predict, /healthz, /readyz, /info and /metrics.

Usage (from a model package's ``__main__``)::

    python -m model_a --port 8001 [--host 127.0.0.1] [--artifacts DIR] [--max-batch 1000]

Every rejected /predict body gets HTTP 400 with ``{"error": "..."}`` (including an oversized batch
or body); unknown paths and wrong methods keep aiohttp's 404 / 405.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from threadpoolctl import threadpool_limits

from modelserver.artifact import Artifact, ArtifactError, load_artifact
from modelserver.metrics import ServerMetrics, create_metrics
from modelserver.predictor import Prediction, Predictor
from modelserver.spec import ModelSpec
from modelserver.validation import InvalidInputError, decode_body, parse_instances

logger = logging.getLogger(__name__)

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_MAX_BATCH: Final = 1000
DEFAULT_ARTIFACTS_DIR: Final = "artifacts"
ARTIFACTS_ENV: Final = "MODEL_ARTIFACTS_DIR"
# Above this many rows a prediction takes milliseconds, so it leaves the event loop.
EXECUTOR_MIN_ROWS: Final = 257
# Worst-case JSON bytes per feature value ("-1.2345678901234567e-308, ") and per row/body overhead.
BYTES_PER_VALUE: Final = 26
MIN_CLIENT_MAX_SIZE: Final = 1024**2
EXIT_ARTIFACT_ERROR: Final = 2
EXIT_LISTEN_ERROR: Final = 1


@dataclass
class Readiness:
    """Whether the model has been warmed up and may receive traffic."""

    ready: bool = False


@dataclass(frozen=True)
class ServerSettings:
    """Validated command-line settings of one model server."""

    host: str
    port: int
    artifacts_dir: Path
    max_batch: int


ARTIFACT_KEY: Final = web.AppKey("artifact", Artifact)
PREDICTOR_KEY: Final = web.AppKey("predictor", Predictor)
METRICS_KEY: Final = web.AppKey("metrics", ServerMetrics)
READINESS_KEY: Final = web.AppKey("readiness", Readiness)
MAX_BATCH_KEY: Final = web.AppKey("max_batch", int)
EXECUTOR_KEY: Final = web.AppKey("executor", ThreadPoolExecutor)


async def predict(request: web.Request) -> web.Response:
    """Predict labels and P(class 1) for ``{"instances": [[...], ...]}``; 400 on bad input."""
    app = request.app
    artifact, metrics = app[ARTIFACT_KEY], app[METRICS_KEY]
    started = time.perf_counter()
    try:
        body = await request.read()
        matrix = parse_instances(decode_body(body), n_features=artifact.n_features, max_batch=app[MAX_BATCH_KEY])
    except web.HTTPRequestEntityTooLarge as exc:
        error = InvalidInputError("body_too_large", f"request body too large: {exc.text}: split the batch")
        return _bad_request(metrics, error)
    except InvalidInputError as error:
        return _bad_request(metrics, error)
    prediction = await _run_prediction(app, matrix)
    response = web.json_response(
        {
            "predictions": prediction.labels,
            "probabilities": prediction.probabilities,
            "model": artifact.name,
            "version": artifact.version,
        }
    )
    metrics.predict_requests.inc()
    metrics.predicted_rows.inc(len(prediction.labels))
    metrics.predict_latency.observe(time.perf_counter() - started)
    return response


async def _run_prediction(app: web.Application, matrix: np.ndarray) -> Prediction:
    """Predict inline for small batches, in the app's executor for large ones."""
    predictor = app[PREDICTOR_KEY]
    if len(matrix) < EXECUTOR_MIN_ROWS:
        return predictor.predict(matrix)
    return await asyncio.get_running_loop().run_in_executor(app[EXECUTOR_KEY], predictor.predict, matrix)


def _bad_request(metrics: ServerMetrics, error: InvalidInputError) -> web.Response:
    """Count a rejected request and answer 400 with the error message."""
    metrics.bad_requests[error.reason].inc()
    return web.json_response({"error": error.message}, status=400)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 once the artifact is loaded and warmed up, else 503."""
    artifact = request.app[ARTIFACT_KEY]
    ready = request.app[READINESS_KEY].ready
    return web.json_response(
        {"status": "ready" if ready else "starting", "model": artifact.name, "version": artifact.version},
        status=200 if ready else 503,
    )


async def info(request: web.Request) -> web.Response:
    """The metadata recorded when the served model was trained."""
    return web.json_response(dict(request.app[ARTIFACT_KEY].metadata))


async def _add_model_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Stamp every response, errors included, with the model name and version."""
    artifact = request.app[ARTIFACT_KEY]
    response.headers["X-Model"] = artifact.name
    response.headers["X-Model-Version"] = artifact.version


async def _prediction_context(app: web.Application) -> AsyncIterator[None]:
    """Own the large-batch executor and warm the model up before reporting ready."""
    # One worker: estimators run single-threaded and the container is sized in cores.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{app[ARTIFACT_KEY].name}-predict") as executor:
        app[EXECUTOR_KEY] = executor
        app[PREDICTOR_KEY].predict(np.zeros((1, app[ARTIFACT_KEY].n_features)))
        app[READINESS_KEY].ready = True
        yield
        app[READINESS_KEY].ready = False


def create_app(spec: ModelSpec, artifact: Artifact, *, max_batch: int = DEFAULT_MAX_BATCH) -> web.Application:
    """Build the model server app for a loaded artifact of ``spec``'s model."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    predictor = Predictor(artifact, spec.positive_probability)
    metrics = create_metrics(model=artifact.name, version=artifact.version)
    client_max_size = max(MIN_CLIENT_MAX_SIZE, max_batch * (artifact.n_features + 1) * BYTES_PER_VALUE)
    app = web.Application(client_max_size=client_max_size)
    app[ARTIFACT_KEY] = artifact
    app[PREDICTOR_KEY] = predictor
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = Readiness()
    app[MAX_BATCH_KEY] = max_batch
    app.cleanup_ctx.append(_prediction_context)
    app.on_response_prepare.append(_add_model_headers)
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    return app


def _positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(spec: ModelSpec, argv: Sequence[str] | None = None) -> ServerSettings:
    """Parse the model server's command line into ServerSettings."""
    parser = argparse.ArgumentParser(prog=f"python -m {spec.NAME}", description=f"Serve {spec.NAME} over HTTP.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 in containers")
    parser.add_argument("--port", type=int, default=spec.DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(os.environ.get(ARTIFACTS_ENV, DEFAULT_ARTIFACTS_DIR)),
        help=f"directory holding {spec.NAME}.joblib (default: ${ARTIFACTS_ENV} or ./{DEFAULT_ARTIFACTS_DIR})",
    )
    parser.add_argument(
        "--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, help="rows per request (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    return ServerSettings(
        host=arguments.host, port=arguments.port, artifacts_dir=arguments.artifacts, max_batch=arguments.max_batch
    )


def main(spec: ModelSpec, argv: Sequence[str] | None = None) -> int:
    """Load ``spec``'s artifact and serve it until SIGINT/SIGTERM (exit 0); 2 if the artifact is unusable."""
    settings = parse_args(spec, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        artifact = load_artifact(settings.artifacts_dir, spec.NAME)
        app = create_app(spec, artifact, max_batch=settings.max_batch)
    except ArtifactError as exc:
        logger.error("%s", exc)
        return EXIT_ARTIFACT_ERROR
    # BLAS/OpenMP pools would fight the event loop for the container's few cores.
    threadpool_limits(limits=1)
    logger.info(
        "serving %s version %s on http://%s:%d (max batch %d)",
        artifact.name,
        artifact.version,
        settings.host,
        settings.port,
        settings.max_batch,
    )
    # No access log: one line per prediction would cost more than the prediction itself.
    try:
        web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return EXIT_LISTEN_ERROR
    logger.info("stopped %s", artifact.name)
    return 0
