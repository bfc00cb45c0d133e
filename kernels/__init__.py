"""Fused ops (Triton kernels + PyTorch references), registered as ``torch.library`` custom ops.

Leftmost layer: imports nothing from training/export/runtime.

Each op has a reference (``*_reference``, plain PyTorch), a Triton launcher (``*_triton``: validates,
allocates or takes ``out=`` buffers, launches), a custom op ``torch.ops.flowturbo.<name>`` (Triton on
CUDA; on CPU the reference, or the Triton interpreter under ``TRITON_INTERPRET=1``) and a dispatcher
taking ``backend=KernelBackend.REFERENCE | TRITON``:

* :func:`layernorm_modulate`, :func:`gated_residual_layernorm_modulate` (``adaln.py``): SiT block glue.
* :func:`cfg_predict`, :func:`cfg_correct` (``solver.py``): solver updates with fused CFG, and
  :class:`SolverOps`, the arithmetic object the one step loop (``flowturbo.integrator``) runs with.
"""

from flowturbo.kernels._common import TRITON_AVAILABLE
from flowturbo.kernels.adaln import (
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    gated_residual_layernorm_modulate_triton,
    layernorm_modulate,
    layernorm_modulate_reference,
    layernorm_modulate_triton,
)
from flowturbo.kernels.backend import (
    KernelBackend,
    KernelFallbackWarning,
    default_kernel_backend,
    require_triton_kernels,
    triton_launch_failure,
)
from flowturbo.kernels.solver import (
    cfg_correct,
    cfg_correct_reference,
    cfg_correct_triton,
    cfg_guided_reference,
    cfg_predict,
    cfg_predict_reference,
    cfg_predict_triton,
    SolverOps,
    advance_reference,
)

__all__ = [
    "TRITON_AVAILABLE",
    "KernelBackend",
    "KernelFallbackWarning",
    "SolverOps",
    "advance_reference",
    "cfg_correct",
    "cfg_correct_reference",
    "cfg_correct_triton",
    "cfg_guided_reference",
    "cfg_predict",
    "cfg_predict_reference",
    "cfg_predict_triton",
    "default_kernel_backend",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
    "gated_residual_layernorm_modulate_triton",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "layernorm_modulate_triton",
    "require_triton_kernels",
    "triton_launch_failure",
]
