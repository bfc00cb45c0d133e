"""The one dtype table: names users type, names manifests store, export precisions, torch dtypes.

Torch-free at import (every layer and the root modules may use it); :func:`torch_dtype` imports torch
when called.
"""

from __future__ import annotations

from typing import Any

from flowturbo.errors import FlowTurboError

FLOAT_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")
"""Floating-point dtypes flowturbo computes in (float64: the reference path only)."""

TENSOR_DTYPE_NAMES = (*FLOAT_DTYPE_NAMES, "int64")
"""Every dtype an exported module's I/O spec may name."""

PRECISION_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""Export precision -> dtype name of its float tensors."""

DTYPE_ALIASES = {
    "fp64": "float64", "double": "float64",
    "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16",
    "bf16": "bfloat16",
}


def dtype_name(value: Any) -> str:
    """Canonical name (``'bfloat16'``) of a name, an alias (``'bf16'``, ``'half'``) or a ``torch.dtype``."""
    text = str(value).removeprefix("torch.")
    name = DTYPE_ALIASES.get(text, text)
    if name not in TENSOR_DTYPE_NAMES:
        raise FlowTurboError(f"unknown dtype {value!r}; choose one of {', '.join(FLOAT_DTYPE_NAMES)}")
    return name


def torch_dtype(value: Any) -> Any:
    """The ``torch.dtype`` for a name, an alias, an export precision (``'fp16'``) or a torch dtype."""
    import torch

    return getattr(torch, dtype_name(value))


def precision_dtype_name(precision: str) -> str:
    """Dtype name of an export precision (``'fp16'`` -> ``'float16'``), with a clear error otherwise."""
    try:
        return PRECISION_DTYPE_NAMES[precision]
    except KeyError:
        raise FlowTurboError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_DTYPE_NAMES)}"
                             ) from None


__all__ = [
    "DTYPE_ALIASES",
    "FLOAT_DTYPE_NAMES",
    "PRECISION_DTYPE_NAMES",
    "TENSOR_DTYPE_NAMES",
    "dtype_name",
    "precision_dtype_name",
    "torch_dtype",
]
