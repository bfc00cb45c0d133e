"""Fused ops (Triton kernels + float32 PyTorch references), registered as torch.library custom ops.

Leftmost layer: imports nothing from training/export/runtime.
"""

from flowturbo.kernels.adaln import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from flowturbo.kernels.backend import KernelBackend

__all__ = [
    "KernelBackend",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
]
