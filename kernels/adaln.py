"""adaLN glue of a SiT block, fused: LayerNorm + modulate, and gated residual + the next LayerNorm + modulate.

A SiT block spends its memory traffic around the matmuls on

    h = LN(x) * (1 + scale[b]) + shift[b]                      (modulate(norm1(x)), before attention / MLP)
    x = x + gate[b] * y;  h = LN(x) * (1 + scale2[b]) + shift2[b]   (residual, then the next norm)

Eager PyTorch reads and writes (B, T, D) several times for each line; one row kernel does each line in a
single pass (statistics in float32, no LN affine, ``eps`` inside the square root as ``nn.LayerNorm``).

Public pieces (DESIGN.md §3, "one file per fused op"):

* ``*_reference``: plain PyTorch, float32 math, any device/dtype/layout (the ``reference`` backend).
* ``*_triton``: the launchers: validate, allocate (or take ``out=`` buffers), launch the Triton kernel.
  They run on CUDA, or on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
* ``torch.ops.flowturbo.layernorm_modulate`` / ``gated_residual_layernorm_modulate``: custom ops
  (``torch.library.triton_op``): Triton on CUDA; on CPU the interpreter when active, else the reference.
  ``torch.compile`` traces through them (Inductor sees the kernel); ``torch.export`` keeps one node.
* ``layernorm_modulate`` / ``gated_residual_layernorm_modulate``: dispatchers taking ``backend=``.

Layout contract of the Triton path (no silent copies): ``x``, ``y`` contiguous (B, T, D); ``shift``,
``scale``, ``gate`` (B, D) contiguous along D with any row stride, so the ``chunk(6, dim=1)`` views of
an adaLN projection are accepted as they are. All inputs share one dtype (float32/float16/bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowturbo.kernels._common import (
    FLOAT_DTYPES,
    MAX_FUSED_ROW,
    check_out,
    check_shape,
    check_tensors,
    is_interpreted,
    launchable,
    register_op,
    require_triton,
    row_launch_config,
    tl,
    triton,
)
from flowturbo.errors import FlowTurboError
from flowturbo.kernels.backend import KernelBackend

ADALN_EPS = 1e-6  # SiT / DiT: nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6); the one value models use


@triton.jit
def _adaln_kernel(
    X, Y, GATE, SHIFT, SCALE, X_OUT, OUT,  # pointers; Y, GATE, X_OUT unused without HAS_RESIDUAL
    n_rows, tokens, width, gate_row_stride, shift_row_stride, scale_row_stride, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_ROWS rows of (B*T, D) per program; each row is one masked block of BLOCK_D columns."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,) flat (b, t) row index
    cols = tl.arange(0, BLOCK_D)  # (BD,)
    mask = (rows < n_rows)[:, None] & (cols < width)[None, :]  # (R, BD)
    offsets = rows[:, None] * width + cols[None, :]  # (R, BD) into (B*T, D)
    batch_idx = (rows // tokens)[:, None]  # (R, 1) which (B, D) modulation row

    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + batch_idx * gate_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        residual = (x + gate * y).to(X_OUT.dtype.element_ty)  # the residual stream keeps its dtype
        tl.store(X_OUT + offsets, residual, mask=mask)
        x = residual.to(tl.float32)  # normalise exactly what was stored, as the unfused code does

    mean = tl.sum(x, axis=1) / width  # (R,)
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / width  # biased, as nn.LayerNorm
    rstd = 1.0 / tl.sqrt(var + eps)
    shift = tl.load(SHIFT + batch_idx * shift_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + batch_idx * scale_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * (1.0 + scale) + shift
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- references


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no call at all when it already is (``Tensor.to`` costs ~1 µs of Python per call, and
    the reference path makes thousands per image at batch 1)."""
    return t if t.dtype == dtype else t.to(dtype)


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = ADALN_EPS
) -> torch.Tensor:
    """``LN(x) * (1 + scale[b]) + shift[b]`` without affine LN parameters, statistics in float32
    (float64 for float64 inputs: the float64 reference path stays float64 end to end).

    x: (B, T, D); shift, scale: (B, D). Returns (B, T, D) in x.dtype.
    """
    compute = _compute_dtype(x.dtype)
    normed = F.layer_norm(_as(x, compute), (x.shape[-1],), eps=eps)  # (B, T, D)
    out = normed * (1 + _as(scale, compute)[:, None, :]) + _as(shift, compute)[:, None, :]
    return _as(out, x.dtype)


def gated_residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = ADALN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + gate[b] * y`` and ``LN(x') * (1 + scale[b]) + shift[b]``; returns ``(x', modulated)``.

    x, y: (B, T, D); gate, shift, scale: (B, D). ``x'`` is rounded to x.dtype before the LayerNorm.
    """
    compute = _compute_dtype(x.dtype)
    residual = _as(_as(x, compute) + _as(gate, compute)[:, None, :] * _as(y, compute), x.dtype)  # (B, T, D)
    return residual, layernorm_modulate_reference(residual, shift, scale, eps)


# --------------------------------------------------------------------------- launchers


def _check_inputs(op: str, x: torch.Tensor, mods: dict[str, torch.Tensor], y: torch.Tensor | None = None) -> None:
    """Shapes, dtypes, devices and layouts the kernel relies on (raises FlowTurboError)."""
    if x.dim() != 3:
        raise FlowTurboError(f"{op}: x must be (B, T, D), got shape {tuple(x.shape)}")
    batch, _, width = x.shape
    tensors = {"x": x} if y is None else {"x": x, "y": y}
    if y is not None:
        check_shape(op, "y", y, tuple(x.shape), "(B, T, D)")
    for name, t in mods.items():
        check_shape(op, name, t, (batch, width), "(B, D)")
    check_tensors(op, {**tensors, **mods}, FLOAT_DTYPES, contiguous=tensors, rows_strided=mods)
    if width > MAX_FUSED_ROW:
        raise FlowTurboError(f"{op}: D = {width} exceeds the fused row limit {MAX_FUSED_ROW}; use backend='reference'")


def _run(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    x_out: torch.Tensor | None,
    out: torch.Tensor | None,
    traceable: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Check, allocate, launch. ``y is None``: plain LayerNorm+modulate (``x_out`` unused, returned None)."""
    has_residual = y is not None
    op = "gated_residual_layernorm_modulate" if has_residual else "layernorm_modulate"
    require_triton(op, _adaln_kernel, x.device)
    mods = {"gate": gate, "shift": shift, "scale": scale} if has_residual else {"shift": shift, "scale": scale}
    _check_inputs(op, x, mods, y=y)
    x_out = check_out(op, "x_out", x_out, x) if has_residual else None
    out = check_out(op, "out", out, x)
    batch, tokens, width = x.shape
    n_rows = batch * tokens
    if n_rows == 0 or width == 0:
        return x_out, out
    block_d, block_rows, num_warps = row_launch_config(width)
    grid = (triton.cdiv(n_rows, block_rows),)
    residual_args = (y, gate, x_out) if has_residual else (x, shift, x)  # placeholders: never read or written
    launchable(_adaln_kernel, traceable)[grid](
        x, residual_args[0], residual_args[1], shift, scale, residual_args[2], out,
        n_rows, tokens, width, residual_args[1].stride(0), shift.stride(0), scale.stride(0), eps,
        HAS_RESIDUAL=has_residual, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
    )
    return x_out, out


def layernorm_modulate_triton(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = ADALN_EPS,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton launcher for ``LN(x) * (1 + scale[b]) + shift[b]``; x (B, T, D), shift/scale (B, D).

    Writes into ``out`` (contiguous, like x) when given, else a new tensor; returns it. A direct eager
    launch (not traceable by make_fx/export: use the custom op / :func:`layernorm_modulate` for that).
    """
    return _run(x, None, None, shift, scale, eps, None, out, traceable=False)[1]


def gated_residual_layernorm_modulate_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = ADALN_EPS,
    *,
    x_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher for ``x' = x + gate[b] * y`` and ``LN(x') * (1 + scale[b]) + shift[b]`` in one pass.

    x, y: (B, T, D); gate, shift, scale: (B, D). Returns ``(x', modulated)`` (into ``x_out``/``out`` if given).
    """
    return _run(x, y, gate, shift, scale, eps, x_out, out, traceable=False)


# --------------------------------------------------------------------------- custom ops
# Each op body is its CUDA kernel, its fake (meta) implementation and, under torch.compile, the
# decomposition Inductor sees: the Triton launch on CUDA, the checked reference on any other device.
# Eager CPU calls go to the registered CPU kernel: the interpreter when active, else the reference.


def _layernorm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cuda":
        return _run(x, None, None, shift, scale, eps, None, None, traceable=True)[1]
    _check_inputs("layernorm_modulate", x, {"shift": shift, "scale": scale})
    return layernorm_modulate_reference(x, shift, scale, eps)


def _layernorm_modulate_cpu(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    if is_interpreted(_adaln_kernel):
        return layernorm_modulate_triton(x, shift, scale, eps)
    return _layernorm_modulate_op(x, shift, scale, eps)


def _gated_op(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda":
        return _run(x, y, gate, shift, scale, eps, None, None, traceable=True)
    _check_inputs("gated_residual_layernorm_modulate", x, {"gate": gate, "shift": shift, "scale": scale}, y=y)
    return gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale, eps)


def _gated_cpu(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_adaln_kernel):
        return gated_residual_layernorm_modulate_triton(x, y, gate, shift, scale, eps)
    return _gated_op(x, y, gate, shift, scale, eps)


layernorm_modulate_op = register_op("layernorm_modulate", _layernorm_modulate_op, _layernorm_modulate_cpu)
gated_residual_layernorm_modulate_op = register_op("gated_residual_layernorm_modulate", _gated_op, _gated_cpu)


# --------------------------------------------------------------------------- dispatchers


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = ADALN_EPS,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> torch.Tensor:
    """``LN(x) * (1 + scale[b]) + shift[b]``; x (B, T, D), shift/scale (B, D); returns (B, T, D).

    ``backend='reference'``: plain PyTorch (any device/layout). ``backend='triton'``: the fused custom op
    (CUDA, or CPU under TRITON_INTERPRET=1); raises FlowTurboError for inputs it cannot take.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        return layernorm_modulate_reference(x, shift, scale, eps)
    require_triton("layernorm_modulate", _adaln_kernel, x.device)
    return layernorm_modulate_op(x, shift, scale, eps)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = ADALN_EPS, backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + gate[b] * y``, ``LN(x') * (1 + scale[b]) + shift[b]``; returns ``(x', modulated)``.

    x, y: (B, T, D); gate, shift, scale: (B, D). Backends as :func:`layernorm_modulate`.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        return gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale, eps)
    require_triton("gated_residual_layernorm_modulate", _adaln_kernel, x.device)
    return gated_residual_layernorm_modulate_op(x, y, gate, shift, scale, eps)
