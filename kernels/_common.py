"""Plumbing shared by the fused ops: optional Triton import, interpreter detection, op registration,
launch configuration and the input checks every launcher runs before touching Triton.

Triton is optional (the ``kernels`` extra). Without it the op modules still import (their kernels are
defined against a stub and never launched) and only ``backend="triton"`` fails, with a message naming
the fix. On a CPU machine Triton runs kernels through its interpreter when ``TRITON_INTERPRET=1`` was
set *before* the kernel modules were imported; :func:`is_interpreted` detects that per kernel.
"""

from __future__ import annotations

import struct
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from flowturbo.errors import FlowTurboError

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # the `kernels` extra is not installed: define kernels against a stub, never launch
    TRITON_AVAILABLE = False
    tl = types.SimpleNamespace(constexpr=object)  # only annotations are evaluated at definition time
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn, language=tl, next_power_of_2=None)

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # no Triton, or a Triton without an interpreter: nothing is ever interpreted
    _InterpretedFunction = None

NAMESPACE = "flowturbo"
MAX_FUSED_ROW = 16384  # widest row a single-pass row kernel keeps in registers
ROW_BLOCK_ELEMENTS = 2048  # target elements per program of a row kernel (rows are packed up to this)
MAX_ROWS_PER_PROGRAM = 16
SOLVER_MIN_BLOCK = 32  # pixels per program of the solver kernel: one (latent plane, pixel block) per program
SOLVER_MAX_BLOCK = 512
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOLVER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FIX_BACKEND = "or use backend='reference'"


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter."""
    return _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction)


def launchable(kernel: Any, traceable: bool) -> Any:
    """The object to index with a grid.

    ``traceable`` (inside a custom op's implementation, which is also its fake impl and its compile-time
    decomposition): ``wrap_triton(kernel)``, so FakeTensor / make_fx / Inductor see the launch (in eager
    ``triton_op`` disables the wrapper and this is the kernel itself). Otherwise, and for interpreted
    kernels (older torch's ``wrap_triton`` rejects them), the raw kernel: a direct eager launch without
    the ~1 ms higher-order-op dispatch.
    """
    if traceable and not is_interpreted(kernel):
        return torch.library.wrap_triton(kernel)
    return kernel


def register_op(name: str, fn: Callable[..., Any], cpu_impl: Callable[..., Any]) -> Any:
    """Register ``fn`` as the custom op ``flowturbo::<name>`` and ``cpu_impl`` as its CPU kernel.

    ``fn`` must be traceable: it is the CUDA implementation, the fake (meta) implementation and, under
    ``torch.compile``, the decomposition Inductor sees (``torch.library.triton_op``). ``torch.export``
    keeps the op as one node. Without Triton (nothing to inline) it is an opaque ``custom_op`` whose
    fake implementation is the same ``fn``.
    """
    qualname = f"{NAMESPACE}::{name}"
    if TRITON_AVAILABLE:
        op = torch.library.triton_op(qualname, fn, mutates_args=())
    else:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)
    op.register_kernel("cpu", cpu_impl)
    return op


def row_launch_config(width: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_ROWS, num_warps)`` for a row kernel over rows of ``width`` elements.

    One row fits one power-of-two block (masked past ``width``); narrow rows are packed several per
    program so each program moves about ``ROW_BLOCK_ELEMENTS`` elements; warps grow with the block.
    """
    block_d = triton.next_power_of_2(int(width))  # a constexpr: a traced (symbolic) width specialises
    block_rows = max(1, min(MAX_ROWS_PER_PROGRAM, ROW_BLOCK_ELEMENTS // block_d))
    elements = block_d * block_rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_d, block_rows, num_warps


def split_float(value: float, wide: bool) -> tuple[float, float]:
    """A Python float as ``(hi, lo)`` kernel arguments (Triton passes float scalars as float32).

    For float64 kernels ``hi + lo`` (summed in float64 inside the kernel) recovers ``value`` to ~48
    bits; for narrower kernels ``(value, 0.0)`` (the kernel rounds to float32 like PyTorch does).
    """
    if not wide:
        return value, 0.0
    hi = struct.unpack("f", struct.pack("f", float(value)))[0]  # round to nearest float32, no tensors
    return hi, float(value) - hi


# --------------------------------------------------------------------------- input checks


def require_triton(op: str, kernel: object, device: torch.device) -> None:
    """Raise unless ``kernel`` can run on ``device``: Triton installed; CUDA, or CPU via the interpreter."""
    if not TRITON_AVAILABLE:
        raise FlowTurboError(
            f"{op}: backend='triton' needs Triton; install it (pip install 'flowturbo[kernels]') {_FIX_BACKEND}"
        )
    if device.type == "cuda":
        return
    if device.type == "cpu" and is_interpreted(kernel):
        return
    raise FlowTurboError(
        f"{op}: backend='triton' needs CUDA tensors, got tensors on {device}; move them to a GPU, "
        f"set TRITON_INTERPRET=1 before importing flowturbo (slow CPU interpreter, for tests) {_FIX_BACKEND}"
    )


def check_tensors(
    op: str,
    tensors: dict[str, torch.Tensor],
    dtypes: Iterable[torch.dtype],
    contiguous: Iterable[str] = (),
    rows_strided: Iterable[str] = (),
) -> None:
    """Same device and dtype for all, dtype in ``dtypes``; names in ``contiguous`` fully contiguous,
    names in ``rows_strided`` contiguous along the last dim (any row stride, e.g. ``chunk`` views)."""
    (first_name, first), *rest = tensors.items()
    dtypes = tuple(dtypes)
    if first.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FlowTurboError(f"{op}: {first_name} has dtype {first.dtype}; supported: {allowed}")
    for name, t in rest:
        if t.dtype != first.dtype:
            raise FlowTurboError(
                f"{op}: dtype mismatch, {name} is {t.dtype} but {first_name} is {first.dtype}; "
                f"cast all inputs to one dtype"
            )
        if t.device != first.device:
            raise FlowTurboError(
                f"{op}: device mismatch, {name} is on {t.device} but {first_name} on {first.device}"
            )
    for name in contiguous:
        if not tensors[name].is_contiguous():
            raise FlowTurboError(
                f"{op}: {name} must be contiguous (strides {tuple(tensors[name].stride())}); "
                f"call .contiguous() on it first"
            )
    for name in rows_strided:
        t = tensors[name]
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise FlowTurboError(
                f"{op}: {name} must be contiguous along its last dim (strides {tuple(t.stride())}); "
                f"call .contiguous() on it first"
            )


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Raise unless ``t.shape == expected`` (``meaning`` spells the expected layout, e.g. ``(B, D)``)."""
    if tuple(t.shape) != tuple(expected):
        raise FlowTurboError(f"{op}: {name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def check_out(op: str, name: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``out`` validated against ``like`` (shape, dtype, device, contiguous), or a fresh ``empty_like``."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise FlowTurboError(
            f"{op}: {name} must be a {tuple(like.shape)} {like.dtype} tensor on {like.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise FlowTurboError(f"{op}: {name} must be contiguous")
    return out
