"""Fréchet distance between Gaussians fitted to features (FID, Heusel et al. 2017).

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

``Tr((S1 S2)^{1/2})`` is computed in a stable symmetric form: with ``A = S1^{1/2}`` (eigh, negative
eigenvalues from round-off clipped to 0), ``S1 S2`` is similar to the symmetric PSD ``A S2 A``, so
``Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(A S2 A))``. This equals the scipy ``sqrtm`` formula used by
pytorch-fid / ADM for PSD inputs, needs no complex arithmetic, and is several times faster at 2048-d.

Reference statistics: ADM-style ``.npz`` files with arrays ``mu`` and ``sigma`` are accepted; our own
files (see ``reference_stats``) add the raw ``features`` so precision / recall can be computed too.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.fileio import atomic_write_bytes

METADATA_KEY = "metadata_json"


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D) with N >= 2."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FlowTurboError(f"feature statistics need features of shape (N >= 2, D), got {f.shape}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise FlowTurboError("features contain NaN or Inf; check the images and the feature extractor")
    mu = f.mean(axis=0)  # (D,)
    sigma = np.cov(f, rowvar=False)  # (D, D)
    return mu, np.atleast_2d(sigma)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from round-off clipped)."""
    sym = (matrix + matrix.T) / 2.0
    eigvals, eigvecs = np.linalg.eigh(sym)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((sigma1 @ sigma2)^{1/2})`` for symmetric PSD matrices, via ``eig(S1^{1/2} S2 S1^{1/2})``."""
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID when fitted to Inception features)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise FlowTurboError(
            f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}; were both computed with the same feature extractor?"
        )
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FlowTurboError(f"covariances {sigma1.shape} / {sigma2.shape} do not match the {d}-d means")
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise FlowTurboError(f"{name} contains NaN or Inf; recompute the statistics")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # tiny negatives are round-off on (near-)identical statistics


@dataclass(frozen=True)
class ReferenceStatistics:
    """Reference side of FID: ``mu`` (D,), ``sigma`` (D, D); ``features`` (M, D) when precision/recall is wanted."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    metadata: dict | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def num_samples(self) -> int | None:
        if self.features is not None:
            return int(self.features.shape[0])
        return (self.metadata or {}).get("num_samples")

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor, metadata: dict | None = None) -> "ReferenceStatistics":
        """Fit the statistics to features (N, D) and keep them (float32) for precision / recall."""
        mu, sigma = feature_statistics(features)
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        return cls(mu=mu, sigma=sigma, features=f.astype(np.float32), metadata=metadata)

    def save_npz(self, path: str | Path) -> None:
        """Write an ADM-compatible ``.npz`` (``mu``, ``sigma``; plus ``features`` / metadata if any), atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["features"] = self.features
        if self.metadata is not None:
            arrays[METADATA_KEY] = np.array(json.dumps(self.metadata, sort_keys=True))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())


def load_reference_npz(path: str | Path) -> ReferenceStatistics:
    """Read reference statistics from ``.npz``: ADM-style (``mu``, ``sigma``) or ours (plus ``features``)."""
    path = Path(path)
    if not path.is_file():
        raise FlowTurboError(f"reference statistics file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise FlowTurboError(
                    f"{path} lacks {missing} (has {data.files}); a reference file needs arrays 'mu' (D,) and "
                    "'sigma' (D, D), as written by ADM's evaluator or ReferenceStatistics.save_npz"
                )
            mu = np.asarray(data["mu"], np.float64)
            sigma = np.asarray(data["sigma"], np.float64)
            features = np.asarray(data["features"], np.float32) if "features" in data.files else None
            metadata = json.loads(str(data[METADATA_KEY])) if METADATA_KEY in data.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # not an npz / damaged archive or array
        raise FlowTurboError(f"cannot read reference statistics {path} ({exc}); regenerate the file") from exc
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FlowTurboError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together (want (D,), (D, D))")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise FlowTurboError(f"{path}: features {features.shape} do not match the {mu.shape[0]}-d statistics")
    return ReferenceStatistics(mu=mu, sigma=sigma, features=features, metadata=metadata)


def fid_from_features(features: np.ndarray | torch.Tensor, reference: ReferenceStatistics) -> float:
    """FID of sample features (N, D) against reference statistics of the same extractor."""
    mu, sigma = feature_statistics(features)
    if mu.shape != reference.mu.shape:
        raise FlowTurboError(
            f"sample features are {mu.shape[0]}-d but the reference is {reference.dim}-d; "
            "use the same feature extractor for both"
        )
    return frechet_distance(mu, sigma, reference.mu, reference.sigma)
