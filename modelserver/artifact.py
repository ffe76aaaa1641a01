"""Model artifacts on disk: file layout, content versions, atomic saving and checked loading.

An artifact is ``<dir>/<name>.joblib`` holding ``{"model": fitted_estimator, "metadata": {...}}``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import joblib

ARTIFACT_SUFFIX: Final = ".joblib"
VERSION_HEX_DIGITS: Final = 12
REQUIRED_METADATA: Final = ("name", "version", "feature_names", "n_features", "metrics")


class ArtifactError(Exception):
    """Base error for artifacts that cannot be served."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The artifact file does not exist (training has not run)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"model artifact not found: {self.path} (run `make train` first)"


class ArtifactInvalidError(ArtifactError, ValueError):
    """The artifact file exists but does not hold a usable model."""


@dataclass(frozen=True)
class Artifact:
    """A fitted estimator and the metadata recorded when it was trained."""

    model: Any
    metadata: Mapping[str, Any]

    @property
    def name(self) -> str:
        """Model name recorded at training time."""
        return str(self.metadata["name"])

    @property
    def version(self) -> str:
        """Content hash of the serialized estimator."""
        return str(self.metadata["version"])

    @property
    def n_features(self) -> int:
        """Number of features every input row must have."""
        return int(self.metadata["n_features"])


def artifact_path(directory: Path, name: str) -> Path:
    """Return where the artifact of model ``name`` lives under ``directory``."""
    return directory / f"{name}{ARTIFACT_SUFFIX}"


def estimator_version(estimator: Any) -> str:
    """Return the first hex digits of the sha256 of the pickled estimator."""
    payload = pickle.dumps(estimator, protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(payload).hexdigest()[:VERSION_HEX_DIGITS]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        # mkstemp creates 0600; containers running as another user must still read artifacts.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def save_artifact(directory: Path, estimator: Any, metadata: Mapping[str, Any]) -> Path:
    """Dump ``{"model", "metadata"}`` to ``<directory>/<metadata name>.joblib`` and return the path."""
    path = artifact_path(directory, str(metadata["name"]))
    buffer = io.BytesIO()
    joblib.dump({"model": estimator, "metadata": dict(metadata)}, buffer)
    write_atomically(path, buffer.getvalue())
    return path


def load_artifact(directory: Path, name: str) -> Artifact:
    """Load and check the artifact of model ``name``; raise ArtifactError naming the path."""
    path = artifact_path(directory, name)
    if not path.is_file():
        raise ArtifactNotFoundError(path)
    try:
        content = joblib.load(path)
    except Exception as exc:  # joblib/pickle raise many unrelated types on corrupt files
        raise ArtifactInvalidError(f"cannot read model artifact {path}: {exc}") from exc
    if not isinstance(content, dict) or not {"model", "metadata"} <= content.keys():
        raise ArtifactInvalidError(f"model artifact {path} is not a dict with 'model' and 'metadata'")
    metadata = content["metadata"]
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ArtifactInvalidError(f"model artifact {path} metadata lacks {', '.join(missing)}")
    if metadata["name"] != name:
        raise ArtifactInvalidError(
            f"model artifact {path} holds model {metadata['name']!r}, expected {name!r}"
        )
    return Artifact(model=content["model"], metadata=metadata)
