"""Typed exceptions raised by the models package; only CLIs turn them into messages and exit codes."""

from __future__ import annotations


class FaceAttendError(Exception):
    """Base of every error the project raises on purpose."""


class ModelError(FaceAttendError):
    """A model's weights are missing, do not match their manifest, or cannot be converted."""


class ModelFormatError(ModelError):
    """A serialised model file (dlib .dat, ONNX) is malformed."""


class BackendError(FaceAttendError):
    """An inference backend failed to build, load or run."""


class BackendUnavailableError(BackendError):
    """The requested backend's runtime (tensorrt, pycuda, a CUDA device) is not installed or not usable here."""


class ImageError(FaceAttendError):
    """An input image is unreadable, corrupt, too large or of an unsupported kind."""


class ConfigError(FaceAttendError):
    """A configuration value or key is invalid."""


class DecisionError(FaceAttendError, ValueError):
    """A decision rule was handed inconsistent neighbours or calibration data (a caller's contract violation)."""


class EvaluationError(FaceAttendError):
    """The data handed to the evaluation cannot be evaluated (impossible protocol, embeddings missing)."""
