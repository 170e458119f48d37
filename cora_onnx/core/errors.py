"""Exception types raised by the library; the CLI turns each into a one-line message and its
`exit_code` (2: bad input; 3: a failed verification)."""

from __future__ import annotations

import numbers

__all__ = [
    "CoraError",
    "InputError",
    "SettingsError",
    "ModelError",
    "DataError",
    "PlanError",
    "OnnxModelError",
    "ParityError",
    "ConstantOutputError",
    "WEIGHT_BITS",
    "check_bits",
]


class CoraError(Exception):
    """Base class of every error the library reports to the user (exit code 2 from the CLI: bad
    input, fixable by changing it, unless a subclass says otherwise)."""

    exit_code = 2


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
    """ONNX Runtime disagrees with the PyTorch model the ONNX file was made from: the file is not
    a faithful export (a defect of the tool or of the exporter, not of the input). Exit code 3.
    quantize keeps the file as NAME.failed.onnx; import-pq writes nothing."""

    exit_code = 3


class ConstantOutputError(ParityError):
    """The model's outputs do not depend on its input (the same logits, e.g. all zeros, on every
    image): whatever ONNX Runtime and PyTorch agree on, the file is not a working classifier and
    is never reported verified. Exit code 3, the file kept as NAME.failed.onnx like a parity failure."""


WEIGHT_BITS = range(2, 9)  # the weight grid widths the tool stores (2-8 bits)


def check_bits(value, name: str = "bits") -> int:
    """value as an int when it is a whole number of weight bits (2-8), else SettingsError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) not in WEIGHT_BITS:
        raise SettingsError(f"{name} must be an integer from 2 to 8, got {value!r}")
    return int(value)
