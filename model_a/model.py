"""model_a: standardised logistic regression, the scikit-learn baseline variant."""

from __future__ import annotations

from typing import Final

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

NAME: Final = "model_a"
DEFAULT_PORT: Final = 8001


def build_estimator(seed: int) -> Pipeline:
    """Return an unfitted StandardScaler + LogisticRegression pipeline."""
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("classify", LogisticRegression(C=1.0, max_iter=1000, random_state=seed)),
        ]
    )


def positive_probability(estimator: Pipeline, matrix: np.ndarray) -> np.ndarray:
    """Return P(class 1) per row; lbfgs logistic regression predicts on one thread already."""
    probabilities: np.ndarray = estimator.predict_proba(matrix)
    return probabilities[:, 1]
