"""k-NN manifold precision and recall (Kynkäänniemi et al., NeurIPS 2019, "Improved Precision and Recall").

Each set of features is approximated by the union of hyperspheres centred on its points, each with the
radius of the distance to that point's k-th nearest neighbour in the same set (k = 3 in the paper).

- precision = fraction of generated samples inside the real manifold (realism),
- recall    = fraction of real samples inside the generated manifold (coverage).

Distances are computed in row batches with ``torch.cdist`` so 10k x 10k (or 50k x 50k) fits in memory:
only a (batch, M) block exists at any time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from flowturbo.errors import FlowTurboError

DEFAULT_K = 3  # neighbourhood size from the paper
DEFAULT_BATCH_SIZE = 1024  # rows of the distance matrix computed at once: (1024, 10k) float32 = 40 MB


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_tensor(features: np.ndarray | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    t = torch.as_tensor(features)
    if t.ndim != 2:
        raise FlowTurboError(f"features must have shape (N, D), got {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)  # distances in at least single precision
    return t.to(device) if device is not None else t


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, *, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Distance from each point (N, D) to its k-th nearest *other* point in the same set -> (N,)."""
    n = features.shape[0]
    if n <= k:
        raise FlowTurboError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    radii = []
    for start in range(0, n, batch_size):
        dist = torch.cdist(features[start : start + batch_size], features)  # (B, N)
        # The smallest distance is the point itself (0); the (k+1)-th smallest is the k-th neighbour.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)  # (N,)


def manifold_coverage(
    queries: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Fraction of ``queries`` (Q, D) inside at least one ball (``centres`` (M, D), ``radii`` (M,))."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        dist = torch.cdist(queries[start : start + batch_size], centres)  # (B, M)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    *,
    k: int = DEFAULT_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> PrecisionRecall:
    """Improved precision and recall of generated features (N, D) against real features (M, D).

    ``device`` defaults to where ``real_features`` live (CPU for numpy input); pass "cuda" to speed up.
    """
    dev = torch.device(device) if device is not None else None
    real = _as_tensor(real_features, dev)
    fake = _as_tensor(fake_features, real.device)
    if real.shape[1] != fake.shape[1]:
        raise FlowTurboError(
            f"real features are {real.shape[1]}-d but generated ones are {fake.shape[1]}-d; use one feature extractor"
        )
    dtype = torch.promote_types(real.dtype, fake.dtype)
    real, fake = real.to(dtype), fake.to(dtype)
    if k < 1:
        raise FlowTurboError(f"k must be at least 1, got {k}")
    if batch_size < 1:
        raise FlowTurboError(f"batch_size must be at least 1, got {batch_size}")
    real_radii = knn_radii(real, k, batch_size=batch_size)  # (M,)
    fake_radii = knn_radii(fake, k, batch_size=batch_size)  # (N,)
    precision = manifold_coverage(fake, real, real_radii, batch_size=batch_size)
    recall = manifold_coverage(real, fake, fake_radii, batch_size=batch_size)
    return PrecisionRecall(precision=precision, recall=recall)
