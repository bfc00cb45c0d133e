"""Which implementation a model uses for its fused ops: an explicit choice, never a global flag."""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING

from flowturbo.errors import FlowTurboError, FlowTurboWarning

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
            choices = ", ".join(repr(b.value) for b in cls)
            raise FlowTurboError(f"unknown kernel backend {value!r}; choose one of {choices}") from None


class KernelFallbackWarning(FlowTurboWarning, RuntimeWarning):
    """Our Triton kernels cannot run on this GPU; the reference ops run instead (the message names the cause)."""


def default_kernel_backend(device: "torch.device") -> KernelBackend:
    """The fast path's choice for ``device``: our Triton kernels on CUDA when Triton is installed *and* its
    kernels compile and run there (:func:`triton_launch_failure`, probed once per device), else the reference
    ops — with one :class:`KernelFallbackWarning` naming the cause when Triton is installed but fails."""
    import warnings

    from flowturbo.kernels._common import TRITON_AVAILABLE

    if device.type != "cuda" or not TRITON_AVAILABLE:
        return KernelBackend.REFERENCE
    failure = triton_launch_failure(device)
    if failure is not None:
        warnings.warn(f"our Triton kernels cannot run on {device} ({failure}); using the reference ops "
                      "(--kernels reference)", KernelFallbackWarning, stacklevel=2)
        return KernelBackend.REFERENCE
    return KernelBackend.TRITON


def require_triton_kernels(device: "torch.device") -> None:
    """Raise a FlowTurboError naming the fix unless our Triton kernels run on ``device`` (``--kernels triton``)."""
    failure = triton_launch_failure(device)
    if failure is not None:
        raise FlowTurboError(f"--kernels triton: our Triton kernels cannot run on {device} ({failure}); use "
                             "--kernels reference, or a GPU and Triton release that work together")


def triton_launch_failure(device: "torch.device") -> str | None:
    """None when the solver and adaLN Triton kernels compile, launch and agree with their references on
    ``device`` (a CUDA device; tiny inputs, once per device per process), else the cause in one line
    (e.g. a GPU architecture this Triton release does not support, or no working compiler)."""
    return _probe(str(device))


@functools.lru_cache(maxsize=None)
def _probe(device: str) -> str | None:
    import torch

    from flowturbo.kernels.adaln import layernorm_modulate_reference, layernorm_modulate_triton
    from flowturbo.kernels.solver import cfg_predict_reference, cfg_predict_triton

    try:
        gen = torch.Generator().manual_seed(0)
        raw, x = (torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
                  for shape in ((2, 4, 4, 4), (1, 4, 4, 4)))
        got = cfg_predict_triton(raw, x, 0.25, 1.5, 3)
        want = cfg_predict_reference(raw, x, 0.25, 1.5, 3)
        tokens, shift, scale = (torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
                                 for shape in ((1, 4, 8), (1, 8), (1, 8)))
        got += (layernorm_modulate_triton(tokens, shift, scale),)
        want += (layernorm_modulate_reference(tokens, shift, scale),)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        for a, b in zip(got, want):
            if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
                return "a probe launch returned wrong values"
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use these kernels here
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first_line}"[:300]
    return None
