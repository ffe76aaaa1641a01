"""Train every model on scikit-learn's bundled breast-cancer data and write artifacts plus held-out rows.

Usage::

    python -m modelserver.train --out artifacts [--seed 42]

Writes ``holdout.json`` (the rows the traffic generator replays) and ``<model>.joblib`` per model.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Final

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split

from model_a import model as model_a
from model_b import model as model_b
from modelserver.artifact import estimator_version, save_artifact, write_atomically
from modelserver.spec import ModelSpec

logger = logging.getLogger(__name__)

DATASET: Final = "breast_cancer"
DEFAULT_SEED: Final = 42
HOLDOUT_FRACTION: Final = 0.3
HOLDOUT_FILE: Final = "holdout.json"
MODEL_SPECS: Final[tuple[ModelSpec, ...]] = (model_a, model_b)


@dataclass(frozen=True)
class Split:
    """A stratified train / held-out split of the dataset."""

    feature_names: tuple[str, ...]
    X_train: np.ndarray
    y_train: np.ndarray
    X_holdout: np.ndarray
    y_holdout: np.ndarray


def load_split(seed: int) -> Split:
    """Load the bundled breast-cancer data and split off a stratified held-out set."""
    dataset = load_breast_cancer()
    X_train, X_holdout, y_train, y_holdout = train_test_split(
        dataset.data,
        dataset.target,
        test_size=HOLDOUT_FRACTION,
        random_state=seed,
        stratify=dataset.target,
    )
    return Split(
        feature_names=tuple(str(name) for name in dataset.feature_names),
        X_train=X_train,
        y_train=y_train,
        X_holdout=X_holdout,
        y_holdout=y_holdout,
    )


def evaluate(estimator: Any, X: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    """Return accuracy, log loss and ROC AUC of a fitted binary classifier on ``X, y``."""
    probabilities = estimator.predict_proba(X)[:, 1]
    return {
        "accuracy": float(accuracy_score(y, estimator.predict(X))),
        "log_loss": float(log_loss(y, probabilities)),
        "roc_auc": float(roc_auc_score(y, probabilities)),
        "n_holdout": len(y),
    }


def library_of(estimator: Any) -> str:
    """Return the distribution name of the library that provides ``estimator``'s final step."""
    final_step = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    top_level_module = type(final_step).__module__.split(".")[0]
    return {"sklearn": "scikit-learn"}.get(top_level_module, top_level_module)


def train_model(spec: ModelSpec, split: Split, seed: int) -> tuple[Any, dict[str, Any]]:
    """Fit ``spec``'s estimator on the training rows and return it with its metadata."""
    estimator = spec.build_estimator(seed)
    estimator.fit(split.X_train, split.y_train)
    library = library_of(estimator)
    metadata = {
        "name": spec.NAME,
        "version": estimator_version(estimator),
        "feature_names": list(split.feature_names),
        "n_features": len(split.feature_names),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": DATASET,
        "seed": seed,
        "library": library,
        "library_version": installed_version(library),
        "metrics": evaluate(estimator, split.X_holdout, split.y_holdout),
    }
    return estimator, metadata


def write_holdout(directory: Path, split: Split, seed: int) -> Path:
    """Write the held-out rows as ``holdout.json`` for the traffic generator."""
    holdout = {
        "dataset": DATASET,
        "seed": seed,
        "feature_names": list(split.feature_names),
        "X": split.X_holdout.tolist(),
        "y": split.y_holdout.tolist(),
    }
    path = directory / HOLDOUT_FILE
    write_atomically(path, json.dumps(holdout).encode())
    return path


def train_all(
    directory: Path, seed: int = DEFAULT_SEED, specs: Sequence[ModelSpec] = MODEL_SPECS
) -> dict[str, Mapping[str, Any]]:
    """Train every model, write artifacts and held-out rows, and return metadata by model name."""
    split = load_split(seed)
    write_holdout(directory, split, seed)
    trained: dict[str, Mapping[str, Any]] = {}
    for spec in specs:
        estimator, metadata = train_model(spec, split, seed)
        path = save_artifact(directory, estimator, metadata)
        logger.info("wrote %s (version %s)", path, metadata["version"])
        trained[spec.NAME] = metadata
    return trained


def summary_table(trained: Mapping[str, Mapping[str, Any]], directory: Path) -> Table:
    """Return a table with one row of held-out metrics per trained model."""
    n_holdout = {metadata["metrics"]["n_holdout"] for metadata in trained.values()}
    table = Table(
        title=f"{directory}: metrics on {', '.join(map(str, n_holdout))} held-out rows",
        box=box.SIMPLE,
    )
    for column in ("model", "version", "library", "accuracy", "log_loss", "roc_auc"):
        table.add_column(column, no_wrap=True)
    for name, metadata in trained.items():
        metrics = metadata["metrics"]
        table.add_row(
            name,
            metadata["version"],
            f"{metadata['library']} {metadata['library_version']}",
            f"{metrics['accuracy']:.4f}",
            f"{metrics['log_loss']:.4f}",
            f"{metrics['roc_auc']:.4f}",
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, write artifacts and print a summary table."""
    parser = argparse.ArgumentParser(prog="python -m modelserver.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for artifacts and holdout.json")
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="split and training seed (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    trained = train_all(arguments.out, arguments.seed)
    Console().print(summary_table(trained, arguments.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
