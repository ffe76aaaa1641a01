"""The contract a model package's ``model`` module fulfils for the shared trainer and server."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class ModelSpec(Protocol):
    """What modelserver needs from ``model_a.model`` / ``model_b.model``."""

    @property
    def NAME(self) -> str:  # noqa: N802 - a module-level constant in implementations
        """Model name: artifact file stem, metric label and ``X-Model`` header."""

    @property
    def DEFAULT_PORT(self) -> int:  # noqa: N802
        """Port the server listens on when ``--port`` is not given."""

    def build_estimator(self, seed: int) -> Any:
        """Return an unfitted binary classifier with ``fit``, ``predict`` and ``predict_proba``."""

    def positive_probability(self, estimator: Any, matrix: np.ndarray) -> np.ndarray:
        """Return P(class 1) per row of an already validated float64 matrix, on one thread."""
