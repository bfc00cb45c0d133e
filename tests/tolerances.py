"""The one tolerance table every numerical test uses (``assert_close(a, b, **tol(...))``).

Keys are dtypes (elementwise kernels against their float32/float64 references) or named comparisons
(whole models, exported graphs). Change a value here, with a reason, never inline in a test.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[object, dict[str, float]] = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    # A whole model (many fused ops, reductions in another order) against the reference backend.
    "model_fp32": dict(atol=1e-4, rtol=1e-4),
    "model_fp16": dict(atol=1e-2, rtol=1e-2),
    # A sampler run end to end in float32 (errors accumulate over steps).
    "sampler_fp32": dict(atol=1e-4, rtol=1e-4),
    # The same with bfloat16 models (float32 state): ~8 bits of mantissa through every model call.
    "sampler_bf16": dict(atol=6e-2, rtol=6e-2),
    # Exported graphs (ONNX Runtime / AOTInductor) against eager PyTorch.
    "export_fp32": dict(atol=1e-4, rtol=1e-4),
    "export_fp16": dict(atol=2e-2, rtol=2e-2),
    # Our E steps against a diffusers flow-matching pipeline (the bound; measured bitwise on the tiny
    # configs in float32, but BLAS may round a batch of 2 differently from two of 1).
    "diffusers_fp32": dict(atol=1e-6, rtol=0),
    # Our H steps against FlowMatchHeunDiscreteScheduler: it reaches its derivative through the x0 detour
    # (x - (x - out * sigma)) / sigma, equal to out only up to float32 rounding, which the following transformer calls
    # carry on (measured on the tiny SD3 of the tests, 3 steps: 5.2e-6 absolute, 2.6e-6 relative).
    "diffusers_heun_fp32": dict(atol=2e-5, rtol=1e-5),
    # A doubled CFG batch against the pipeline's two separate calls (FLUX true CFG): BLAS rounds a batch of 2B rows
    # differently from two of B.
    "diffusers_batched_fp32": dict(atol=1e-5, rtol=1e-5),
    # Image bytes after decode + quantisation.
    "uint8_image": dict(atol=1, rtol=0),
    # The same, read back from PNGs as floats in [-1, 1]: one quantisation level is 2/255.
    "uint8_image_as_float": dict(atol=2 / 255 + 1e-6, rtol=0),
}


def tol(key: object) -> dict[str, float]:
    """Tolerance kwargs for ``torch.testing.assert_close``."""
    return dict(TOLERANCES[key])
