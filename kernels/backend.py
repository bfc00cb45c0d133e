"""Which implementation a model uses for its fused ops: an explicit choice, never a global flag."""

from __future__ import annotations

import enum


class KernelBackend(str, enum.Enum):
    """``REFERENCE``: plain PyTorch (any device, the default). ``TRITON``: fused Triton kernels (CUDA)."""

    REFERENCE = "reference"
    TRITON = "triton"

    @classmethod
    def coerce(cls, value: "KernelBackend | str") -> "KernelBackend":
        try:
            return cls(value)
        except ValueError:
            from flowturbo.errors import FlowTurboError

            choices = ", ".join(repr(b.value) for b in cls)
            raise FlowTurboError(f"unknown kernel backend {value!r}; choose one of {choices}") from None
