"""Single-threaded inference over a loaded artifact: feature matrix in, labels and P(class 1) out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from modelserver.artifact import Artifact, ArtifactInvalidError

THREAD_PARAMS: Final = frozenset({"n_jobs", "num_threads"})
# Both libraries predict class 1 only when P(class 1) > 0.5 (argmax picks class 0 on a tie).
DECISION_THRESHOLD: Final = 0.5

PositiveProbability = Callable[[Any, np.ndarray], np.ndarray]


def pin_single_thread(estimator: Any) -> None:
    """Set every ``n_jobs`` / ``num_threads`` parameter of ``estimator`` (and its steps) to 1."""
    # Requests are tiny and concurrent: a thread pool per call only adds wake-up latency and contention.
    parameters = estimator.get_params(deep=True)
    updates = {
        key: 1 for key, value in parameters.items() if key.rsplit("__", 1)[-1] in THREAD_PARAMS and value != 1
    }
    if updates:
        estimator.set_params(**updates)


@dataclass(frozen=True)
class Prediction:
    """Predicted labels and positive-class probabilities, as JSON-ready lists."""

    labels: list[int]
    probabilities: list[float]


class Predictor:
    """A fitted binary classifier pinned to one thread, predicting through its model's fast path."""

    def __init__(self, artifact: Artifact, positive_probability: PositiveProbability) -> None:
        classes = getattr(artifact.model, "classes_", None)
        if classes is None or len(classes) != 2:
            raise ArtifactInvalidError(
                f"model {artifact.name!r} must be a fitted binary classifier, has classes {classes!r}"
            )
        pin_single_thread(artifact.model)
        self.artifact = artifact
        self._estimator = artifact.model
        self._classes = np.asarray(classes)
        self._positive_probability = positive_probability

    def predict(self, matrix: np.ndarray) -> Prediction:
        """Predict labels and P(class 1) for each row of ``matrix``."""
        probabilities = self._positive_probability(self._estimator, matrix)
        labels = self._classes.take((probabilities > DECISION_THRESHOLD).astype(np.intp))
        return Prediction(labels=labels.tolist(), probabilities=probabilities.tolist())
