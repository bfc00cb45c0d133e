"""Solver updates with classifier-free guidance fused in: one pass from the raw model output to the new state.

Every step kind of DESIGN.md §2 is a sequence of two updates after a model call on the doubled batch
``[x; x]`` with labels ``[y; null]``. The model output ``raw`` is (2B, C_out, H, W): rows ``:B``
conditional (``c``), rows ``B:`` unconditional (``u``); only the first C channels are velocity
(C_out = 2C for ``learn_sigma`` checkpoints). The guided velocity is

    g = u + s * (c - u)   on channels  < guidance_channels   (all channels when None)
    g = c                 on channels >= guidance_channels

Unguided channels take the *conditional* value. This is what the official code computes:
SiT ``models.py::forward_with_cfg`` and FlowTurbo ``models_assemble.py`` (``forward_with_cfg`` and
``VelocityRefinerBlock._forward``) guide ``model_out[:, :3]`` and concatenate ``rest = model_out[:, 3:]``
of the whole doubled batch; the sampler keeps the first (conditional) half, so its channel 3 moves with
the conditional velocity (the sigma channels are dropped before guidance by ``x.chunk(2, dim=1)``).
A ``raw`` of only B rows means "no guidance" (the model was run on the conditional batch): g = c.

The two ops (``h`` = step size, ``s`` = guidance scale):

* ``cfg_predict(raw, x, h, s, G, base=None) -> (d, x_pred)``: ``d = base + g``, ``x_pred = x + h d``
  (Euler step; Heun / pseudo-corrector predictor half; refiner first call with ``base = v``).
* ``cfg_correct(raw, x, d, h, s, G, base=None) -> (x_new, d2)``: ``d2 = base + g``,
  ``x_new = x + h/2 (d + d2)`` (Heun / pseudo-corrector corrector; refiner second call with ``base = d``).

One kernel with constexpr flags serves both. Arithmetic is float64 for a float64 state, else float32;
outputs have x's dtype. ``h`` and ``s`` are Python floats: a fixed schedule has constant steps, so they
are baked into a CUDA graph / specialised by ``torch.compile``, which is what we want (no host syncs).

Layout contract of the Triton path: ``x``, ``d``, ``base`` contiguous (B, C, H, W) (velocities (B, 2C, H, W)
in the per-CFG-half layout); ``raw`` with any batch and channel strides but contiguous (H, W) planes (so
``raw[:, :C]`` views are fine). The state shares one dtype; ``raw`` may have another (a bfloat16 model
feeding a float32 state is read and widened inside the kernel).
"""

from __future__ import annotations

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.kernels._common import (
    SOLVER_DTYPES,
    SOLVER_MAX_BLOCK,
    SOLVER_MIN_BLOCK,
    check_out,
    check_shape,
    check_tensors,
    is_interpreted,
    launchable,
    register_op,
    require_triton,
    split_float,
    tl,
    triton,
)
from flowturbo.kernels.backend import KernelBackend


@triton.jit
def _to_compute(value, WIDE: tl.constexpr):
    """Cast a tensor or scalar to the arithmetic dtype: float64 when WIDE, else float32."""
    if WIDE:
        return tl.cast(value, tl.float64)
    else:
        return tl.cast(value, tl.float32)


@triton.jit
def _cfg_step_kernel(
    RAW, X, D_PREV, BASE, D_OUT, X_OUT,  # D_PREV unused unless IS_CORRECT, BASE unless HAS_BASE
    channels, hw, raw_stride_b, raw_stride_c, uncond_offset, guidance_channels, velocity_stride_b,
    h_hi, h_lo, s_hi, s_lo,
    HAS_UNCOND: tl.constexpr, HAS_BASE: tl.constexpr, IS_CORRECT: tl.constexpr, HALVES: tl.constexpr,
    WIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per (latent plane b*C + c, block of pixels): no per-element index division.

    x / x_out are (B, C, H, W); the velocities (d_prev, base, d_out) are (B, C, H, W), or (B, 2C, H, W)
    with HALVES (channels C: hold the unconditional half); raw rows are gathered through its strides.
    """
    plane = tl.program_id(0).to(tl.int64)  # b * C + c
    batch = plane // channels
    channel = plane - batch * channels
    pixel = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pixel < hw
    x_offsets = plane * hw + pixel
    v_offsets = batch * velocity_stride_b + channel * hw + pixel
    raw_offsets = batch * raw_stride_b + channel * raw_stride_c + pixel  # conditional row of raw
    is_guided = (tl.zeros_like(pixel) + channel) < guidance_channels  # (BLOCK,): one value per program

    cond = _to_compute(tl.load(RAW + raw_offsets, mask=mask, other=0.0), WIDE)  # c
    velocity = cond
    if HAS_UNCOND:
        uncond_mask = mask & is_guided
        if HALVES:
            uncond_mask = mask  # the unconditional half keeps its own unguided channels
        uncond = _to_compute(tl.load(RAW + uncond_offset + raw_offsets, mask=uncond_mask, other=0.0), WIDE)
        s = _to_compute(s_hi, WIDE) + _to_compute(s_lo, WIDE)
        guided = uncond + s * (cond - uncond)
        velocity = tl.where(is_guided, guided, cond)
        if HALVES:
            velocity_uncond = tl.where(is_guided, guided, uncond)
    else:
        if HALVES:  # an already guided doubled velocity: its second half is channels C.. of raw
            velocity_uncond = _to_compute(
                tl.load(RAW + raw_offsets + channels * raw_stride_c, mask=mask, other=0.0), WIDE)
    if HAS_BASE:
        velocity = _to_compute(tl.load(BASE + v_offsets, mask=mask, other=0.0), WIDE) + velocity
        if HALVES:
            velocity_uncond = _to_compute(
                tl.load(BASE + v_offsets + channels * hw, mask=mask, other=0.0), WIDE) + velocity_uncond

    h = _to_compute(h_hi, WIDE) + _to_compute(h_lo, WIDE)
    x = _to_compute(tl.load(X + x_offsets, mask=mask, other=0.0), WIDE)
    if IS_CORRECT:
        d_prev = _to_compute(tl.load(D_PREV + v_offsets, mask=mask, other=0.0), WIDE)
        x_new = x + (h * 0.5) * (d_prev + velocity)
    else:
        x_new = x + h * velocity
    tl.store(D_OUT + v_offsets, velocity.to(D_OUT.dtype.element_ty), mask=mask)
    if HALVES:
        tl.store(D_OUT + v_offsets + channels * hw, velocity_uncond.to(D_OUT.dtype.element_ty), mask=mask)
    tl.store(X_OUT + x_offsets, x_new.to(X_OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- references


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cfg_guided_reference(
    raw: torch.Tensor, batch: int, channels: int, scale: float, guidance_channels: int | None = None,
    halves: bool = False,
) -> torch.Tensor:
    """The guided velocity from a raw model output of 2B rows (CFG) or B rows (already guided / no CFG).

    raw: (2B or B, C_out >= C, H, W). Returns (B, C, H, W), or with ``halves`` the per-CFG-half layout
    (B, 2C, H, W) of :mod:`flowturbo.integrator` (channels ``C:`` = the unconditional half: guided channels,
    then its own unguided ones; from B rows, raw's channels ``C:2C`` are that half already). float64 math for
    float64 ``raw``, else float32. The result may share memory with ``raw`` (a B-row raw in the compute dtype
    is returned as a view): callers whose producer reuses its output buffers copy first.
    """
    _check_raw_rows("cfg_guided_reference", raw, batch)
    compute = _compute_dtype(raw.dtype)
    guided = channels if guidance_channels is None else guidance_channels
    if raw.shape[0] == batch:  # no unconditional rows: the velocity is the conditional output as is
        return raw[:, : 2 * channels if halves else channels].to(compute)
    cond = raw[:batch, :channels].to(compute)  # (B, C, H, W)
    uncond = raw[batch:, :channels].to(compute)  # (B, C, H, W)
    if guided == channels:  # every channel guided: both halves equal
        mixed = uncond + scale * (cond - uncond)  # eq. u + s (c - u)
        return torch.cat([mixed, mixed], dim=1) if halves else mixed
    if guided == 0:
        return torch.cat([cond, uncond], dim=1) if halves else cond.clone()
    mixed = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])  # (B, G, H, W)
    parts = [mixed, cond[:, guided:]] + ([mixed, uncond[:, guided:]] if halves else [])
    return torch.cat(parts, dim=1)


def _first_half(velocity: torch.Tensor, channels: int) -> torch.Tensor:
    """The conditional half (what moves x) of a velocity in either layout: (B, C, H, W)."""
    return velocity if velocity.shape[1] == channels else velocity[:, :channels]


def cfg_predict_reference(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d = base + g(raw)``, ``x_pred = x + h d``; returns ``(d, x_pred)`` in x.dtype.

    raw: (2B or B, C_out, H, W); x: (B, C, H, W); base and d: (B, C, H, W), or (B, 2C, H, W) with ``halves``
    (x moves with the first C channels). float64 math for float64 x, else float32.
    """
    compute = _compute_dtype(x.dtype)
    channels = x.shape[1]
    d = cfg_guided_reference(raw, x.shape[0], channels, scale, guidance_channels, halves).to(compute)
    if base is not None:
        d = base.to(compute) + d
    x_pred = x.to(compute) + h * _first_half(d, channels)
    return d.to(x.dtype), x_pred.to(x.dtype)


def cfg_correct_reference(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d2 = base + g(raw)``, ``x_new = x + h/2 (d + d2)``; returns ``(x_new, d2)`` in x.dtype.

    raw: (2B or B, C_out, H, W); x: (B, C, H, W); d, base, d2 as in :func:`cfg_predict_reference`.
    float64 math for float64 x, else float32.
    """
    compute = _compute_dtype(x.dtype)
    channels = x.shape[1]
    d2 = cfg_guided_reference(raw, x.shape[0], channels, scale, guidance_channels, halves).to(compute)
    if base is not None:
        d2 = base.to(compute) + d2
    x_new = x.to(compute) + (h / 2) * (_first_half(d, channels).to(compute) + _first_half(d2, channels))
    return x_new.to(x.dtype), d2.to(x.dtype)


def advance_reference(x: torch.Tensor, d: torch.Tensor, h: float) -> torch.Tensor:
    """``x + h d`` with d in either velocity layout (the P step's predictor half with a carried d)."""
    compute = _compute_dtype(x.dtype)
    return (x.to(compute) + h * _first_half(d, x.shape[1]).to(compute)).to(x.dtype)


# --------------------------------------------------------------------------- checks and launchers


def _check_raw_rows(op: str, raw: torch.Tensor, batch: int) -> None:
    if raw.dim() != 4 or raw.shape[0] not in (batch, 2 * batch):
        raise FlowTurboError(
            f"{op}: raw must be (2B, C_out, H, W) with B = {batch} (conditional rows first, then "
            f"unconditional) or (B, C_out, H, W) without guidance; got shape {tuple(raw.shape)}"
        )


def _resolve_guidance(op: str, channels: int, guidance_channels: int | None) -> int:
    if guidance_channels is None:
        return channels
    if not 0 <= guidance_channels <= channels:
        raise FlowTurboError(
            f"{op}: guidance_channels must be in [0, {channels}] or None (all), got {guidance_channels}"
        )
    return guidance_channels


def _check_inputs(
    op: str, raw: torch.Tensor, x: torch.Tensor, guidance_channels: int | None, state: dict[str, torch.Tensor],
    halves: bool = False,
) -> int:
    """Validate shapes/dtypes/layouts (FlowTurboError); returns the resolved number of guided channels."""
    if x.dim() != 4:
        raise FlowTurboError(f"{op}: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    _check_raw_rows(op, raw, batch)
    need = 2 * channels if halves and raw.shape[0] == batch else channels
    if raw.shape[1] < need or tuple(raw.shape[2:]) != (height, width):
        raise FlowTurboError(
            f"{op}: raw must be ({raw.shape[0]}, C_out >= {need}, {height}, {width}) to match x {tuple(x.shape)}, "
            f"got {tuple(raw.shape)}"
        )
    velocity_shape = (batch, 2 * channels if halves else channels, height, width)
    for name, t in state.items():
        if name != "x":
            layout = "(B, 2C, H, W): both CFG halves" if halves else "(B, C, H, W) like x"
            check_shape(op, name, t, velocity_shape, layout)
    # The state (x, d, base) shares one dtype; raw may be narrower (a bf16 model output feeding a float32
    # state: the kernel reads it and computes in float32, so no separate cast pass).
    check_tensors(op, {"x": x, **{k: v for k, v in state.items() if k != "x"}}, SOLVER_DTYPES,
                  contiguous=[n for n in state])
    check_tensors(op, {"raw": raw}, SOLVER_DTYPES)
    if raw.device != x.device:
        raise FlowTurboError(f"{op}: device mismatch, raw is on {raw.device} but x on {x.device}")
    if (width > 1 and raw.stride(3) != 1) or (height > 1 and raw.stride(2) != width):
        raise FlowTurboError(
            f"{op}: raw must have contiguous (H, W) planes (strides {tuple(raw.stride())}); call .contiguous()"
        )
    return _resolve_guidance(op, channels, guidance_channels)


def solver_launch_config(hw: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the solver kernel for latent planes of ``hw`` pixels.

    One program per (plane, pixel block): blocks of up to :data:`SOLVER_MAX_BLOCK` pixels, 4 elements per
    thread at full size (128-bit fp32 accesses), fewer warps for small planes.
    """
    block = max(SOLVER_MIN_BLOCK, min(SOLVER_MAX_BLOCK, triton.next_power_of_2(int(hw))))
    return block, max(1, min(4, block // 128))


def _run(
    raw: torch.Tensor,
    x: torch.Tensor,
    d_prev: torch.Tensor | None,
    h: float,
    scale: float,
    guidance_channels: int | None,
    base: torch.Tensor | None,
    d_out: torch.Tensor | None,
    x_out: torch.Tensor | None,
    traceable: bool,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate, launch; returns ``(new velocity, new state)``. ``d_prev is None``: predict."""
    op = "cfg_predict" if d_prev is None else "cfg_correct"
    require_triton(op, _cfg_step_kernel, x.device)
    state = {"x": x} if d_prev is None else {"x": x, "d": d_prev}
    if base is not None:
        state["base"] = base
    guided = _check_inputs(op, raw, x, guidance_channels, state, halves)
    batch, channels, height, width = x.shape
    velocity_like = x if not halves else x.new_empty((batch, 2 * channels, height, width))
    d_out = check_out(op, "d_out", d_out, velocity_like)
    x_out = check_out(op, "x_out", x_out, x)
    if x.numel() == 0:
        return d_out, x_out
    hw = height * width
    wide = x.dtype == torch.float64
    h_hi, h_lo = split_float(h, wide)
    s_hi, s_lo = split_float(scale, wide)
    block, num_warps = solver_launch_config(hw)
    grid = (batch * channels, triton.cdiv(hw, block))
    launchable(_cfg_step_kernel, traceable)[grid](
        raw, x, x if d_prev is None else d_prev, x if base is None else base, d_out, x_out,  # x: placeholders
        channels, hw, raw.stride(0), raw.stride(1), batch * raw.stride(0), guided, d_out.shape[1] * hw,
        h_hi, h_lo, s_hi, s_lo,
        HAS_UNCOND=bool(raw.shape[0] == 2 * batch), HAS_BASE=base is not None, IS_CORRECT=d_prev is not None,
        HALVES=bool(halves), WIDE=wide, BLOCK=block, num_warps=num_warps,
    )
    return d_out, x_out


def cfg_predict_triton(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    *,
    halves: bool = False,
    d_out: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of :func:`cfg_predict_reference`; returns ``(d, x_pred)`` (into the buffers if given).

    A direct eager launch (not traceable by make_fx/export: use :func:`cfg_predict` for that).
    """
    return _run(raw, x, None, h, scale, guidance_channels, base, d_out, x_out, traceable=False, halves=halves)


def cfg_correct_triton(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    *,
    halves: bool = False,
    x_out: torch.Tensor | None = None,
    d_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of :func:`cfg_correct_reference`; returns ``(x_new, d2)`` (into the buffers if given)."""
    d2, x_new = _run(raw, x, d, h, scale, guidance_channels, base, d_out, x_out, traceable=False, halves=halves)
    return x_new, d2


# --------------------------------------------------------------------------- custom ops
# The op schema takes guidance_channels as a resolved int (the dispatchers map None -> C). Each op body
# is its CUDA kernel, its fake (meta) implementation and, under torch.compile, the decomposition
# Inductor sees: the Triton launch on CUDA, the checked reference elsewhere. Eager CPU calls go to the
# registered CPU kernel: the interpreter when active, else the reference.


def _concrete(*scalars: object) -> bool:
    """True for plain Python numbers. A tracer may hand the op symbolic floats (``torch.compile`` with
    dynamic float inputs); Triton gets constants only, so such a trace uses the reference decomposition
    (which Inductor fuses by itself) instead of the hand-written kernel."""
    return all(isinstance(s, (int, float)) for s in scalars)


def _predict_op(
    raw: torch.Tensor, x: torch.Tensor, h: float, scale: float, guidance_channels: int, base: torch.Tensor | None,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda" and _concrete(h, scale):
        return _run(raw, x, None, h, scale, guidance_channels, base, None, None, traceable=True, halves=halves)
    _check_inputs("cfg_predict", raw, x, guidance_channels, {"x": x} if base is None else {"x": x, "base": base},
                  halves)
    return cfg_predict_reference(raw, x, h, scale, guidance_channels, base, halves)


def _predict_cpu(
    raw: torch.Tensor, x: torch.Tensor, h: float, scale: float, guidance_channels: int, base: torch.Tensor | None,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_cfg_step_kernel):
        return cfg_predict_triton(raw, x, h, scale, guidance_channels, base, halves=halves)
    return _predict_op(raw, x, h, scale, guidance_channels, base, halves)


def _correct_op(
    raw: torch.Tensor, x: torch.Tensor, d: torch.Tensor, h: float, scale: float, guidance_channels: int,
    base: torch.Tensor | None, halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda" and _concrete(h, scale):
        d2, x_new = _run(raw, x, d, h, scale, guidance_channels, base, None, None, traceable=True, halves=halves)
        return x_new, d2
    state = {"x": x, "d": d} if base is None else {"x": x, "d": d, "base": base}
    _check_inputs("cfg_correct", raw, x, guidance_channels, state, halves)
    return cfg_correct_reference(raw, x, d, h, scale, guidance_channels, base, halves)


def _correct_cpu(
    raw: torch.Tensor, x: torch.Tensor, d: torch.Tensor, h: float, scale: float, guidance_channels: int,
    base: torch.Tensor | None, halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_cfg_step_kernel):
        return cfg_correct_triton(raw, x, d, h, scale, guidance_channels, base, halves=halves)
    return _correct_op(raw, x, d, h, scale, guidance_channels, base, halves)


cfg_predict_op = register_op("cfg_predict", _predict_op, _predict_cpu)
cfg_correct_op = register_op("cfg_correct", _correct_op, _correct_cpu)


# --------------------------------------------------------------------------- dispatchers


def cfg_predict(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor update with fused CFG: ``d = base + g(raw)``, ``x_pred = x + h d``; returns ``(d, x_pred)``.

    raw: (2B, C_out, H, W) model output on ``[x; x]`` with labels ``[y; null]`` (or B rows: already guided);
    x: (B, C, H, W); base and d (B, C, H, W), or (B, 2C, H, W) with ``halves`` (the per-CFG-half velocity
    of :mod:`flowturbo.integrator`); ``guidance_channels`` None guides all C channels. ``backend`` as in
    :func:`flowturbo.kernels.layernorm_modulate`.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        if x.dim() == 4:
            _resolve_guidance("cfg_predict", x.shape[1], guidance_channels)
        return cfg_predict_reference(raw, x, h, scale, guidance_channels, base, halves)
    require_triton("cfg_predict", _cfg_step_kernel, x.device)
    if x.dim() != 4:
        raise FlowTurboError(f"cfg_predict: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    guided = _resolve_guidance("cfg_predict", x.shape[1], guidance_channels)
    return cfg_predict_op(raw, x, float(h), float(scale), guided, base, bool(halves))


def cfg_correct(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
    halves: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrector update with fused CFG: ``d2 = base + g(raw)``, ``x_new = x + h/2 (d + d2)``; returns
    ``(x_new, d2)``.

    raw: (2B, C_out, H, W) (or B rows: already guided); x (B, C, H, W); d, base as :func:`cfg_predict`.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        if x.dim() == 4:
            _resolve_guidance("cfg_correct", x.shape[1], guidance_channels)
        return cfg_correct_reference(raw, x, d, h, scale, guidance_channels, base, halves)
    require_triton("cfg_correct", _cfg_step_kernel, x.device)
    if x.dim() != 4:
        raise FlowTurboError(f"cfg_correct: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    guided = _resolve_guidance("cfg_correct", x.shape[1], guidance_channels)
    return cfg_correct_op(raw, x, d, float(h), float(scale), guided, base, bool(halves))


# --------------------------------------------------------------------------- solver ops


class SolverOps:
    """The arithmetic of the one step loop (:func:`flowturbo.integrator.integrate`) for one guidance setting.

    ``scale`` / ``guidance_channels`` combine a raw 2B-row model output (``u + s (c - u)`` on the first
    ``guidance_channels`` channels; ``None``: all); a B-row raw is taken as already guided. ``halves``:
    velocities have the per-CFG-half layout (B, 2C, H, W) (:func:`flowturbo.integrator.carries_halves`).
    ``backend``: ``reference`` (plain PyTorch, float32 math for half types, float64 kept — the ground
    truth) or ``triton`` (the fused kernel: guidance + update in one pass; CUDA, or the CPU interpreter).
    """

    def __init__(self, scale: float = 1.0, guidance_channels: int | None = None, *, halves: bool = False,
                 backend: KernelBackend | str = KernelBackend.REFERENCE) -> None:
        self.scale = float(scale)
        self.guidance_channels = guidance_channels
        self.halves = bool(halves)
        self.backend = KernelBackend.coerce(backend)

    def check_device(self, device: torch.device | str) -> None:
        """Raise a FlowTurboError naming the fix when this backend cannot run on ``device``."""
        if self.backend is KernelBackend.TRITON:
            require_triton("solver ops", _cfg_step_kernel, torch.device(device))

    def describe(self) -> str:
        return f"{self.backend.value} solver ops" + (" (per-CFG-half velocity)" if self.halves else "")

    def predict(self, raw: torch.Tensor, x: torch.Tensor, h: float,
                base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d, x + h d)`` with ``d = base + g(raw)``."""
        return cfg_predict(raw, x, h, self.scale, self.guidance_channels, base, self.backend, self.halves)

    def correct(self, raw: torch.Tensor, x: torch.Tensor, d: torch.Tensor, h: float,
                base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + h/2 (d + d2), d2)`` with ``d2 = base + g(raw)``."""
        return cfg_correct(raw, x, d, h, self.scale, self.guidance_channels, base, self.backend, self.halves)

    def advance(self, x: torch.Tensor, d: torch.Tensor, h: float) -> torch.Tensor:
        """``x + h d`` (a P step's predicted point from the carried velocity)."""
        if self.backend is KernelBackend.TRITON:
            return torch.add(x, _first_half(d, x.shape[1]), alpha=h)  # one fused elementwise kernel
        return advance_reference(x, d, h)
