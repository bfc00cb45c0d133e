"""evaluate_samples: FID / precision / recall / class accuracy end to end on a tiny synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation import (
    ClassifierConfig,
    DomainFeatures,
    FashionClassifier,
    ReferenceStatistics,
    evaluate_samples,
    fashion_mnist_reference,
)
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range, write_idx

N_TEST = 29
TINY = ClassifierConfig(widths=(4, 8, 8), embed_dim=6)


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(1, 256, size=(N_TEST, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=(N_TEST,), dtype=np.uint8))
    return folder


@pytest.fixture
def features():
    torch.manual_seed(0)
    return DomainFeatures(FashionClassifier(TINY).eval(), device="cpu")


def run(images, labels, features, root, tmp_path, **kwargs):
    kwargs.setdefault("num_reference", N_TEST)
    kwargs.setdefault("allow_small_sample", True)  # the synthetic test split is tiny
    return evaluate_samples(images, labels, features=features, root=root, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def test_domain_features_batching_and_resizing(features, seeded):
    images = torch.rand(11, 1, 32, 32, generator=seeded) * 2 - 1
    expected = features.classifier.features(images).detach()
    for batch_size in (1, 4, 100):
        got = features.extract(images, batch_size=batch_size, progress=False)
        torch.testing.assert_close(got, expected, **tol("model_fp32"))
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")  # (11, 1, 64, 64)
    assert features.extract(big, progress=False).shape == (11, TINY.embed_dim)  # resized to 32x32
    torch.testing.assert_close(features.predict(images, batch_size=3), features.classifier(images).argmax(dim=1))


def test_reference_images_score_perfectly(root, features, tmp_path):
    images = to_model_range(load_fashion_mnist("test", root).images)  # (29, 1, 32, 32)
    result = run(images, None, features, root, tmp_path)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["num_samples"] == N_TEST and result["num_reference"] == N_TEST
    assert result["features"] == "domain" and result["k"] == 3
    assert "class_accuracy" not in result


def test_noise_scores_badly(root, features, tmp_path, seeded):
    noise = torch.rand(21, 1, 32, 32, generator=seeded) * 2 - 1
    result = run(noise, None, features, root, tmp_path)
    images = to_model_range(load_fashion_mnist("test", root).images)
    assert result["fid"] > run(images[:21], None, features, root, tmp_path)["fid"]
    assert result["num_samples"] == 21


def test_class_accuracy_is_argmax_vs_conditioning_labels(root, features, tmp_path, seeded):
    images = torch.rand(13, 1, 32, 32, generator=seeded) * 1.8 - 0.9
    predicted = features.classifier(images).argmax(dim=1)
    assert run(images, predicted, features, root, tmp_path)["class_accuracy"] == 1.0
    assert run(images, (predicted + 1) % 10, features, root, tmp_path)["class_accuracy"] == 0.0
    half = predicted.clone()
    half[:6] = (half[:6] + 3) % 10
    assert run(images, half.numpy(), features, root, tmp_path)["class_accuracy"] == pytest.approx(7 / 13)


def test_rgb_input_and_explicit_classifier(root, features, tmp_path, seeded):
    grey = torch.rand(11, 1, 32, 32, generator=seeded) * 2 - 1
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    a, b = run(grey, None, features, root, tmp_path), run(rgb, None, features, root, tmp_path)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-5)
    judge = FashionClassifier(TINY).eval()
    labels = judge(grey).argmax(dim=1)
    assert run(grey, labels, features, root, tmp_path, classifier=judge)["class_accuracy"] == 1.0


def test_reference_objects_and_adm_npz(root, features, tmp_path, seeded):
    ref = fashion_mnist_reference(features, num_samples=N_TEST, root=root, cache_dir=tmp_path / "c", progress=False)
    images = torch.rand(9, 1, 32, 32, generator=seeded) * 2 - 1
    with_features = run(images, None, features, root, tmp_path, reference=ref)
    path = tmp_path / "adm.npz"
    np.savez(path, mu=ref.mu, sigma=ref.sigma)  # an ADM-style file: statistics only
    stats_only = run(images, None, features, root, tmp_path, reference=path)
    assert stats_only["fid"] == pytest.approx(with_features["fid"], rel=1e-9)
    assert stats_only["precision"] is None and stats_only["recall"] is None
    assert with_features["precision"] is not None
    wrong_dim = ReferenceStatistics(mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(FlowTurboError, match="same feature extractor"):
        run(images, None, features, root, tmp_path, reference=wrong_dim)


def test_bad_inputs(root, features, tmp_path, seeded):
    images = torch.rand(7, 1, 32, 32, generator=seeded) * 2 - 1
    with pytest.raises(FlowTurboError, match=r"x / 127.5 - 1"):
        run(images * 127.5 + 127.5, None, features, root, tmp_path)
    with pytest.raises(FlowTurboError, match="NaN"):
        run(torch.where(images > 0.9, torch.nan, images), None, features, root, tmp_path)
    with pytest.raises(FlowTurboError, match="one class id per image"):
        run(images, torch.zeros(6, dtype=torch.long), features, root, tmp_path)
    with pytest.raises(FlowTurboError, match="null class"):
        run(images, torch.full((7,), 10), features, root, tmp_path)
    with pytest.raises(FlowTurboError, match=r"\(N, 1 or 3, H, W\)"):
        run(images[:, 0], None, features, root, tmp_path)
    with pytest.raises(FlowTurboError, match="more than k=3"):
        run(images[:3], None, features, root, tmp_path)
    with pytest.raises(FlowTurboError, match="FeatureExtractor"):
        evaluate_samples(images, features=features.classifier)


def test_fid_needs_more_samples_than_feature_dimensions():
    """D-d features need D + 1 samples (a non-singular covariance) on top of the general minimum; the eval CLI
    applies it to Inception's 2048-d features before drawing anything."""
    from flowturbo.runtime.cli import main
    from flowturbo.training.evaluation import MIN_METRIC_SAMPLES, check_sample_count

    assert check_sample_count(2049, feature_dim=2048) is None
    with pytest.raises(FlowTurboError, match=r"at least 2049 samples \(samples\), got 2048"):
        check_sample_count(2048, feature_dim=2048)
    assert "2048-d" in check_sample_count(2048, feature_dim=2048, allow_small_sample=True)
    assert check_sample_count(MIN_METRIC_SAMPLES, feature_dim=64) is None  # small features: the general rule
    with pytest.raises(FlowTurboError, match=f"at least {MIN_METRIC_SAMPLES} samples"):
        check_sample_count(MIN_METRIC_SAMPLES - 1, feature_dim=64)
    assert main(["eval", "--features", "inception", "--num-samples", "1000", "--device", "cpu"]) == 2
