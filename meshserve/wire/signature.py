"""The types a model signature is made of: tensor and parameter specs, and the arrays they describe.

Both sides of a Predict call read them: the servers check requests against a signature, the
gateway builds requests from one. Nothing here knows gRPC or torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# One named input or output: a numpy array, or a list of byte strings for BYTES tensors
# (a BYTES tensor of shape [n] is a list of n bytes; higher ranks are not used by models).
Array = np.ndarray | list[bytes]
Arrays = dict[str, Array]
ParamValue = bool | int | float | str
Params = Mapping[str, ParamValue]

# dtype names as numpy spells them, plus "bytes" for opaque byte strings.
NUMERIC_DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)
BYTES = "bytes"
DTYPES = (*NUMERIC_DTYPES, BYTES)


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output.

    `shape` uses -1 for a variable dimension; the first dimension is the batch (always -1 for
    inputs). `max_shape` bounds each variable dimension (same length as `shape`, 0 = no bound
    beyond the message limit). `max_element_bytes` bounds each element of a BYTES tensor.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    max_shape: tuple[int, ...] = ()
    max_element_bytes: int = 0
    optional: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"TensorSpec {self.name!r}: dtype {self.dtype!r} not in {DTYPES}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: dims must be positive or -1")
        if self.max_shape and len(self.max_shape) != len(self.shape):
            raise ValueError(f"TensorSpec {self.name!r}: max_shape must have len(shape) entries")


@dataclass(frozen=True)
class ParamSpec:
    """A request parameter the model accepts (k, a threshold …), with its default and bounds."""

    name: str
    kind: type  # bool, int, float or str
    default: ParamValue
    min: float | None = None
    max: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (bool, int, float, str):
            raise ValueError(f"ParamSpec {self.name!r}: kind must be bool, int, float or str")


@dataclass(frozen=True)
class Signature:
    """What a model takes and returns."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[ParamSpec, ...] = ()

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def param(self, name: str) -> ParamSpec | None:
        for spec in self.parameters:
            if spec.name == name:
                return spec
        return None


def rows(value: Array) -> int:
    """The batch size of one input or output (its first dimension)."""
    return len(value) if isinstance(value, list) else int(value.shape[0])
