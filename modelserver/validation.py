"""Turns a /predict request body into a float64 feature matrix, or an InvalidInputError naming the bad field.

The happy path does a few C-level passes (type sets, one ``np.array``, one ``np.isfinite``);
the per-value Python loops run only after a check has failed, to name the offending row and column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import chain
from typing import Any, Final

import numpy as np

# The bounded set of values of the ``reason`` metric label.
REASONS: Final = (
    "invalid_json",
    "body_too_large",
    "not_object",
    "missing_instances",
    "instances_not_list",
    "empty_batch",
    "batch_too_large",
    "row_not_list",
    "wrong_feature_count",
    "non_numeric",
    "non_finite",
)
NUMBER_TYPES: Final = frozenset({int, float})  # exact types: bool is an int subclass and is rejected
JSON_TYPE_NAMES: Final = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class InvalidInputError(ValueError):
    """A request body that cannot be predicted on; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown invalid-input reason: {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


def json_type_name(value: Any) -> str:
    """Return the JSON name (object, array, string, ...) of a decoded JSON value."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def decode_body(body: bytes) -> Any:
    """Decode a request body as JSON; raise InvalidInputError if it is not valid JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInputError("invalid_json", f"request body is not valid JSON: {exc}") from exc


def parse_instances(payload: Any, *, n_features: int, max_batch: int) -> np.ndarray:
    """Return ``payload["instances"]`` as an (n_rows, n_features) float64 matrix after checking it."""
    example = '{"instances": [[f1, ..., f%d], ...]}' % n_features
    if not isinstance(payload, dict):
        raise InvalidInputError(
            "not_object", f"request body must be a JSON object like {example}, got {json_type_name(payload)}"
        )
    if "instances" not in payload:
        raise InvalidInputError("missing_instances", f"request body lacks the field 'instances': send {example}")
    rows = payload["instances"]
    if not isinstance(rows, list):
        raise InvalidInputError(
            "instances_not_list", f"'instances' must be a list of rows, got {json_type_name(rows)}"
        )
    if not rows:
        raise InvalidInputError("empty_batch", "'instances' is empty: send at least one row")
    if len(rows) > max_batch:
        raise InvalidInputError(
            "batch_too_large",
            f"'instances' has {len(rows)} rows, above the limit of {max_batch} per request: split the batch",
        )
    if set(map(type, rows)) != {list}:
        raise _row_not_list(rows, n_features)
    if set(map(len, rows)) != {n_features}:
        index, row = next((index, row) for index, row in enumerate(rows) if len(row) != n_features)
        raise InvalidInputError(
            "wrong_feature_count", f"instances[{index}] has {len(row)} features, expected {n_features}"
        )
    if not set(map(type, chain.from_iterable(rows))) <= NUMBER_TYPES:
        index, column, value = next(
            (index, column, value) for index, column, value in _cells(rows) if type(value) not in NUMBER_TYPES
        )
        raise InvalidInputError(
            "non_numeric",
            f"instances[{index}][{column}] must be a number, got {json_type_name(value)} {_preview(value)}",
        )
    try:
        matrix = np.array(rows, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float64 range
        index, column, value = next(
            (index, column, value) for index, column, value in _cells(rows) if not _fits_float(value)
        )
        raise InvalidInputError(
            "non_finite", f"instances[{index}][{column}] = {_preview(value)} is outside the float64 range"
        ) from None
    finite = np.isfinite(matrix)
    if not finite.all():
        index, column = (int(position) for position in np.argwhere(~finite)[0])
        raise InvalidInputError(
            "non_finite",
            f"instances[{index}][{column}] is {matrix[index, column]}: NaN and infinity are not accepted",
        )
    return matrix


def _row_not_list(rows: list[Any], n_features: int) -> InvalidInputError:
    """Build the error for an 'instances' list holding something other than rows."""
    if all(type(row) in NUMBER_TYPES for row in rows):
        return InvalidInputError(
            "row_not_list",
            "'instances' must be a list of rows (lists of numbers), got a flat list of numbers: "
            f"wrap a single row as [[f1, ..., f{n_features}]]",
        )
    index, row = next((index, row) for index, row in enumerate(rows) if type(row) is not list)
    return InvalidInputError(
        "row_not_list", f"instances[{index}] must be a list of {n_features} numbers, got {json_type_name(row)}"
    )


def _cells(rows: list[list[Any]]) -> Iterator[tuple[int, int, Any]]:
    """Yield (row index, column index, value) for every cell, for locating a bad value."""
    for index, row in enumerate(rows):
        for column, value in enumerate(row):
            yield index, column, value


def _fits_float(value: Any) -> bool:
    """Return whether ``value`` converts to a float64 without overflowing."""
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _preview(value: Any, limit: int = 40) -> str:
    """Return a short JSON rendering of ``value`` for an error message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
