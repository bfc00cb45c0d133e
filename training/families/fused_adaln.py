"""Our fused adaLN kernel inside diffusers transformers, where their blocks share the SiT modulate pattern.

diffusers' ``AdaLayerNormZero`` (SD3's ``JointTransformerBlock``, FLUX's double-stream blocks) and
``AdaLayerNormZeroSingle`` (FLUX's single-stream blocks) compute

    emb = linear(silu(emb)); shift, scale, gate, ... = emb.chunk(...)
    x = LayerNorm(x, no affine, eps) * (1 + scale[:, None]) + shift[:, None]

— exactly :func:`flowturbo.kernels.layernorm_modulate` (``LN(x) * (1 + scale[b]) + shift[b]``, x (B, T, D)), the
SiT block glue that the fast path runs as one fused Triton kernel. :func:`fuse_adaln` swaps those modules' forward
for one that calls it (the chunking and the other outputs unchanged); every other normalisation is left alone and
*said*, with why, in the :class:`AdaLNFusion` report (``run.json`` records it):

* ``AdaLayerNormContinuous`` (the last norm of SD3 / FLUX, SD3's context-only last block): its chunks are
  ``(scale, shift)`` and its LayerNorm may carry affine parameters — another pattern;
* ``SD35AdaLayerNormZeroX`` (SD3.5's dual-attention blocks): two modulated norms of one input — not fused yet;
* an ``AdaLayerNormZero`` built with ``norm_type="fp32_layer_norm"`` or an affine LayerNorm — not the kernel's LN.

The gated residuals that follow (``x + gate * attn``) stay diffusers' own: fusing them into the next norm, as the
SiT blocks do, would mean rewriting the blocks' forward. With ``backend="reference"`` nothing is swapped (the
module is diffusers' exactly). Verified on CPU through the Triton interpreter (tests); speed on a GPU unmeasured.
"""

from __future__ import annotations

import dataclasses
import types
from collections import Counter
from typing import Any

import torch
from torch import nn

from flowturbo.kernels import KernelBackend, layernorm_modulate

FUSED_MARK = "_flowturbo_fused_adaln"
NOT_FUSED = {
    "AdaLayerNormContinuous": "chunks (scale, shift) and a LayerNorm that may be affine: another pattern",
    "SD35AdaLayerNormZeroX": "two modulated norms of one input (SD3.5 dual attention): not fused yet",
    "AdaLayerNormContinuousX": "another pattern",
}


@dataclasses.dataclass(frozen=True)
class AdaLNFusion:
    """Which of a transformer's adaptive norms run our fused kernel, and why the others do not."""

    backend: str
    fused: dict[str, int]  # class name -> modules swapped
    not_fused: dict[str, str]  # class name -> why (with the count)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _plain_layernorm(norm: Any) -> bool:
    return type(norm) is nn.LayerNorm and not norm.elementwise_affine


def _fused_forward_zero(self: nn.Module, x: torch.Tensor, timestep: Any = None, class_labels: Any = None,
                        hidden_dtype: Any = None, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``AdaLayerNormZero.forward`` with the modulated LayerNorm fused (x (B, T, D), emb (B, E))."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))  # (B, 6 D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)  # (B, D) each
    x = layernorm_modulate(x.contiguous(), shift_msa.contiguous(), scale_msa.contiguous(), self.norm.eps,
                           backend=getattr(self, FUSED_MARK))  # (B, T, D)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _fused_forward_single(self: nn.Module, x: torch.Tensor,
                          emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``AdaLayerNormZeroSingle.forward`` with the modulated LayerNorm fused."""
    emb = self.linear(self.silu(emb))  # (B, 3 D)
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)  # (B, D) each
    x = layernorm_modulate(x.contiguous(), shift_msa.contiguous(), scale_msa.contiguous(), self.norm.eps,
                           backend=getattr(self, FUSED_MARK))
    return x, gate_msa


FUSED_FORWARDS = {"AdaLayerNormZero": _fused_forward_zero, "AdaLayerNormZeroSingle": _fused_forward_single}


def fuse_adaln(transformer: nn.Module, backend: KernelBackend | str) -> AdaLNFusion:
    """Swap the forward of ``transformer``'s modulated LayerNorms that match the kernel for the fused one
    (``backend="triton"``); ``"reference"`` swaps nothing (and undoes an earlier fusion). Returns the report."""
    backend = KernelBackend.coerce(backend)
    fused: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    for module in transformer.modules():
        name = type(module).__name__
        if hasattr(module, FUSED_MARK):  # a fusion from before: back to diffusers' own forward first
            del module.forward
            delattr(module, FUSED_MARK)
        if name in FUSED_FORWARDS:
            if not _plain_layernorm(getattr(module, "norm", None)):
                skipped[name] += 1
                reasons[name] = "its LayerNorm is affine or float32-forced (norm_type='fp32_layer_norm'): not the " \
                                "kernel's LN"
                continue
            if backend is KernelBackend.TRITON:
                setattr(module, FUSED_MARK, backend)
                module.forward = types.MethodType(FUSED_FORWARDS[name], module)
                fused[name] += 1
        elif name in NOT_FUSED:
            skipped[name] += 1
            reasons[name] = NOT_FUSED[name]
    not_fused = {name: f"{count} module(s): {reasons[name]}" for name, count in sorted(skipped.items())}
    return AdaLNFusion(backend.value, dict(sorted(fused.items())), not_fused)


__all__ = ["AdaLNFusion", "fuse_adaln"]
