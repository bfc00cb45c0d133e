"""Reference statistics cache: keyed by a hash of (extractor weights, dataset bytes, sample count), never by existence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation.classifier import ClassifierConfig, FashionClassifier
from flowturbo.training.evaluation.features import DomainFeatures
from flowturbo.training.evaluation.fid import feature_statistics, load_reference_npz
from flowturbo.training.evaluation.reference_stats import (
    CACHE_ENV_VAR,
    CACHE_SUBDIR,
    default_cache_dir,
    fashion_mnist_reference,
    reference_cache_key,
    reference_key_fields,
)
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range, write_idx

N_TEST = 23
TINY = ClassifierConfig(widths=(4, 8, 8), embed_dim=6)


class CountingFeatures(DomainFeatures):
    """DomainFeatures that counts how many images it was asked to embed."""

    def __init__(self, classifier):
        super().__init__(classifier, device="cpu")
        self.calls = 0

    def extract(self, images, **kwargs):
        self.calls += 1
        return super().extract(images, **kwargs)


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(1, 256, size=(N_TEST, 28, 28), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=(N_TEST,), dtype=np.uint8))
    return folder


@pytest.fixture
def extractor():
    torch.manual_seed(0)
    return CountingFeatures(FashionClassifier(TINY).eval())


def cached_files(cache):
    return sorted((cache / CACHE_SUBDIR).glob("*.npz"))


def test_computes_then_reuses(root, extractor, tmp_path):
    cache = tmp_path / "cache"
    first = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 1 and first.features.shape == (17, TINY.embed_dim)
    images = to_model_range(load_fashion_mnist("test", root, limit=17).images)
    expected = extractor.classifier.features(images).detach()
    torch.testing.assert_close(torch.from_numpy(first.features), expected, atol=1e-5, rtol=1e-5)
    mu, sigma = feature_statistics(first.features)
    np.testing.assert_allclose(first.mu, mu)
    np.testing.assert_allclose(first.sigma, sigma)

    again = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 1  # served from the cache
    np.testing.assert_array_equal(again.features, first.features)
    files = cached_files(cache)
    assert len(files) == 1 and not list((cache / CACHE_SUBDIR).glob(".*tmp"))
    assert load_reference_npz(files[0]).metadata["key_fields"]["num_samples"] == 17


def test_changed_weights_change_the_key(root, extractor, tmp_path):
    cache = tmp_path / "cache"
    key_before = reference_cache_key(reference_key_fields(extractor, num_samples=17, root=root))
    old = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    with torch.no_grad():
        extractor.classifier.embed.bias += 0.5
    key_after = reference_cache_key(reference_key_fields(extractor, num_samples=17, root=root))
    assert key_after != key_before
    new = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 2 and len(cached_files(cache)) == 2
    np.testing.assert_allclose(new.features, old.features + 0.5, atol=1e-5)


def test_sample_count_and_dataset_bytes_change_the_key(root, extractor, tmp_path):
    cache = tmp_path / "cache"
    fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    fashion_mnist_reference(extractor, num_samples=19, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 2
    # Same file names, same sizes, one pixel different: a re-installed / modified dataset.
    images = load_fashion_mnist("test", root).images.copy()
    images[0, 14, 14] ^= 0xFF
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 3 and len(cached_files(cache)) == 3


def test_unreadable_or_mismatched_cache_is_recomputed(root, extractor, tmp_path):
    cache = tmp_path / "cache"
    good = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    (path,) = cached_files(cache)
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable"):
        again = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert extractor.calls == 2
    np.testing.assert_array_equal(again.features, good.features)
    assert load_reference_npz(path).features.shape == (17, TINY.embed_dim)  # rewritten, readable

    # A file at this key's name whose stored key fields differ (e.g. copied by hand) is not trusted.
    other = fashion_mnist_reference(extractor, num_samples=19, root=root, cache_dir=cache, progress=False)
    other_path = next(p for p in cached_files(cache) if p != path)
    path.write_bytes(other_path.read_bytes())
    with pytest.warns(UserWarning, match="does not match"):
        fixed = fashion_mnist_reference(extractor, num_samples=17, root=root, cache_dir=cache, progress=False)
    assert fixed.features.shape == (17, TINY.embed_dim) and other.features.shape == (19, TINY.embed_dim)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "flowturbo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "flowturbo"


def test_bad_requests(root, extractor, tmp_path):
    with pytest.raises(FlowTurboError, match="has only 23 images"):
        fashion_mnist_reference(extractor, num_samples=30, root=root, cache_dir=tmp_path, progress=False)
    with pytest.raises(FlowTurboError, match="num_samples must be in 2..10000"):
        fashion_mnist_reference(extractor, num_samples=10_001, root=root, cache_dir=tmp_path, progress=False)
    with pytest.raises(FlowTurboError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_reference(extractor, num_samples=5, root=tmp_path / "none", cache_dir=tmp_path, progress=False)
