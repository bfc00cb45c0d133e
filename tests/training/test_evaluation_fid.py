"""Fréchet distance, feature statistics and reference .npz files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation.fid import (
    ReferenceStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_reference_npz,
    trace_sqrt_product,
)

FID_ATOL = 1e-8  # float64 eigen-decompositions of small matrices


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d + 3))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_fid(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(37, 5)) * np.arange(1, 6) + 3.0
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    with pytest.raises(FlowTurboError, match="N >= 2"):
        feature_statistics(f[:1])
    with pytest.raises(FlowTurboError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(301, 9)) @ rng.normal(size=(9, 9)) + 1.5
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=FID_ATOL * np.trace(sigma))


def test_one_dimensional_closed_form():
    # N(0, 1) vs N(3, 4): (0-3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 10
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == pytest.approx(10.0)


def test_diagonal_closed_form():
    rng = np.random.default_rng(2)
    d = 11
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.2, 3.0, size=d), rng.uniform(0.2, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2.0 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_shifted_samples_give_the_squared_shift():
    # Shifting a sample set by c leaves its covariance unchanged: FID = |c|^2 exactly.
    rng = np.random.default_rng(3)
    f = rng.normal(size=(257, 6)) @ rng.normal(size=(6, 6))
    shift = rng.normal(size=6)
    expected = float(shift @ shift)
    assert fid_from_features(f + shift, ReferenceStatistics.from_features(f)) == pytest.approx(expected, rel=1e-8)


def test_sampled_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(4)
    n, d, scale = 20_000, 3, 2.0
    shift = np.array([1.0, -0.5, 2.0])
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) * scale + shift
    expected = shift @ shift + d * (1.0 + scale**2 - 2.0 * scale)  # = 5.25 + 3
    assert fid_from_features(b, ReferenceStatistics.from_features(a)) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("d", [1, 7, 24])
def test_matches_scipy_sqrtm_formula(d):
    rng = np.random.default_rng(10 + d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-8, abs=FID_ATOL)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-10)


def test_rank_deficient_covariances_are_handled():
    # Fewer samples than dimensions: singular covariances (the usual case for small FID sets).
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 10)), rng.normal(size=(8, 10)) + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-5)


def test_shape_and_value_errors():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(FlowTurboError, match="same feature extractor"):
        frechet_distance(mu, sigma, np.zeros(4), np.eye(4))
    with pytest.raises(FlowTurboError, match="do not match"):
        frechet_distance(mu, sigma, mu, np.eye(2))
    with pytest.raises(FlowTurboError, match="NaN"):
        frechet_distance(mu, sigma, np.full(3, np.nan), sigma)
    with pytest.raises(FlowTurboError, match="same feature extractor"):
        fid_from_features(np.random.default_rng(0).normal(size=(5, 2)), ReferenceStatistics(mu, sigma))


def test_adm_style_npz_is_accepted(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.normal(size=4), random_spd(rng, 4)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=rng.integers(0, 255, size=(3, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma)
    ref = load_reference_npz(path)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert ref.features is None and ref.num_samples is None


def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(19, 5)).astype(np.float32)
    ref = ReferenceStatistics.from_features(feats, metadata={"num_samples": 19, "note": "x"})
    path = tmp_path / "sub" / "ref.npz"
    path.parent.mkdir()
    ref.save_npz(path)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    back = load_reference_npz(path)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.features, feats)
    assert back.metadata == {"num_samples": 19, "note": "x"} and back.num_samples == 19


def test_bad_reference_files(tmp_path):
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(3))
    with pytest.raises(FlowTurboError, match="'sigma'"):
        load_reference_npz(no_sigma)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(FlowTurboError, match="cannot read"):
        load_reference_npz(garbage)
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(FlowTurboError, match="do not fit"):
        load_reference_npz(mismatched)
    with pytest.raises(FlowTurboError, match="not found"):
        load_reference_npz(tmp_path / "missing.npz")
