"""Which implementation a model uses for its fused ops: an explicit choice, never a global flag."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def default_kernel_backend(device: "torch.device") -> KernelBackend:
    """The fast path's choice for ``device``: our Triton kernels on CUDA when Triton is installed, else the
    reference ops (CPU, or a CUDA machine without Triton)."""
    from flowturbo.kernels._common import TRITON_AVAILABLE

    return KernelBackend.TRITON if device.type == "cuda" and TRITON_AVAILABLE else KernelBackend.REFERENCE
