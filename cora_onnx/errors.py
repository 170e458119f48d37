"""Exception types raised by the library; the CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations

__all__ = [
    "CoraError",
    "InputError",
    "SettingsError",
    "ModelError",
    "DataError",
    "PlanError",
    "OnnxModelError",
    "ParityError",
]


class CoraError(Exception):
    """Base class of every error the user can fix by changing the input."""


class InputError(CoraError):
    """A missing or unreadable file or folder, or an output path that cannot be written."""


class SettingsError(CoraError, ValueError):
    """An option outside its allowed range (bits, budgets, block sizes...)."""


class ModelError(CoraError):
    """An unknown architecture, weights that do not fit it, or non-finite weights."""


class DataError(CoraError):
    """An image folder that is empty, undecodable or whose classes do not fit the model."""


class PlanError(CoraError):
    """A plan file that is malformed or does not fit the model it is applied to."""


class OnnxModelError(CoraError):
    """An ONNX file that is corrupt, unsupported, or lacks what a pass needs."""


class ParityError(CoraError):
    """The ONNX file does not reproduce the PyTorch model it was made from (nothing is written)."""
