"""One exception hierarchy for the whole toolkit (training, export, runtime).

Library code raises these; only the CLIs turn them into one line on stderr and an exit code.
Each class carries the exit code its failure class maps to (documented in the README).
"""

from __future__ import annotations

__all__ = [
    "RDError",
    "UsageError",
    "InputError",
    "ImageError",
    "CheckpointError",
    "ArtifactError",
    "ManifestError",
    "EngineMismatchError",
    "VerificationError",
    "DependencyError",
    "EXIT_CODES",
]


class RDError(Exception):
    """Base of every error the toolkit raises on purpose."""

    exit_code = 1


class UsageError(RDError, ValueError):
    """Bad option values or combinations."""

    exit_code = 2


class InputError(RDError):
    """A user file could not be used (missing, unreadable, wrong kind)."""

    exit_code = 3


class ImageError(InputError):
    """An image file is corrupt, truncated, not an image, or too large."""


class CheckpointError(InputError):
    """A checkpoint is truncated, not a checkpoint, unsafe, or does not match its config."""


class ArtifactError(RDError):
    """An exported artifact (ONNX / plan) is unusable."""

    exit_code = 4


class ManifestError(ArtifactError):
    """A manifest is missing, malformed, or fails schema validation."""


class EngineMismatchError(ArtifactError):
    """A plan was built for another TensorRT version / GPU, or its hash does not match."""


class VerificationError(RDError):
    """An exported artifact does not compute what the torch reference computes."""

    exit_code = 5


class DependencyError(RDError):
    """An optional dependency (tensorrt, cuda-python, PyAV, ...) is missing."""

    exit_code = 6


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error",
    2: "usage error (bad option or value, or no input matched)",
    3: "input error (missing/unreadable/corrupt file, bad checkpoint)",
    4: "artifact error (bad ONNX/plan/manifest, engine built elsewhere)",
    5: "verification failed (export does not match the torch reference)",
    6: "missing optional dependency",
    7: "partial failure: some files of a batch failed or are incomplete (status partial; see the report)",
    130: "interrupted (Ctrl-C / SIGINT); no partial or temporary files are left",
    143: "terminated (SIGTERM); no partial or temporary files are left",
}
