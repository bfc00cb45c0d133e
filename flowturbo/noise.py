"""The one rule for initial noise: image ``i`` of a run with seed ``s`` starts from its own seed ``s + i``.

Every sampler draws x_0 through :func:`make_noise`: the PyTorch sampler, the exported backends (ONNX Runtime,
AOTInductor, TensorRT), the reference functions of ``flowturbo.training.sampling``, the tuner, and — mirrored
bit for bit in C++ — the schedule runner (``ScheduleRunner::make_noise`` in ``runtime/csrc/runner.cpp``,
pinned by ``tests/runtime/test_cpp_runner.py``).

Image ``i`` (its *global* index in the request: 0 for the first image) gets ``x_0[i] ~ N(0, I)`` of shape
(C, H, W), drawn in float32 by torch's CPU generator (mt19937) seeded with :func:`image_seed` ``(s + i) mod 2^64``,
then moved and cast. So an image depends on the seed and its index only — not on the batch size, not on how
many processes share the work (``torchrun``: rank r draws only its own indices, ``first_index``), not on the
device or dtype.

This root module imports torch only when noise is drawn (``import flowturbo.noise`` stays torch-free, like the
rest of the root package); it imports no layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SEED_MODULUS = 2**64  # torch's CPU generator takes a 64-bit seed; per-image seeds wrap around, as in C++ uint64


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a run seeded with ``seed``: ``(seed + index) mod 2^64``."""
    return (int(seed) + int(index)) % SEED_MODULUS


def make_noise(batch: int, latent_shape: Sequence[int], seed: int, dtype: Any = None, *,
               device: Any = "cpu", first_index: int = 0) -> Any:
    """x_0 for images ``first_index .. first_index + batch - 1``: a (batch, C, H, W) tensor.

    Row ``j`` is ``randn((C, H, W))`` in float32 from a CPU generator seeded with
    ``image_seed(seed, first_index + j)``, then moved to ``device`` and cast to ``dtype`` (default float32).
    """
    import torch

    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    shape = tuple(int(d) for d in latent_shape)
    generator = torch.Generator(device="cpu")
    noise = torch.empty((batch, *shape), dtype=torch.float32)  # (batch, C, H, W)
    for j in range(batch):
        generator.manual_seed(image_seed(seed, first_index + j))
        noise[j] = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=torch.float32 if dtype is None else dtype)


__all__ = ["SEED_MODULUS", "image_seed", "make_noise"]
