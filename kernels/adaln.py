"""adaLN glue of a SiT block (reference implementations; the Triton kernels build on these names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowturbo.kernels.backend import KernelBackend


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x) * (1 + scale[b]) + shift[b]`` without affine LN parameters, statistics in float32.

    x: (B, T, D); shift, scale: (B, D). Returns (B, T, D) in x.dtype.
    """
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)  # (B, T, D) fp32
    out = normed * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return out.to(x.dtype)


def gated_residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x + gate[b] * y`` and ``LN(x') * (1 + scale[b]) + shift[b]``; returns ``(x', modulated)``.

    x, y: (B, T, D); gate, shift, scale: (B, D).
    """
    residual = (x.float() + gate.float()[:, None, :] * y.float()).to(x.dtype)  # (B, T, D)
    return residual, layernorm_modulate_reference(residual, shift, scale, eps)


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> torch.Tensor:
    """Dispatch ``layernorm_modulate`` to the chosen backend."""
    KernelBackend.coerce(backend)
    return layernorm_modulate_reference(x, shift, scale, eps)


def gated_residual_layernorm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    eps: float = 1e-6, backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch ``gated_residual_layernorm_modulate`` to the chosen backend."""
    KernelBackend.coerce(backend)
    return gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale, eps)
