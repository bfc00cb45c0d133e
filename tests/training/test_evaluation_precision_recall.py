"""k-NN manifold precision / recall (Kynkäänniemi et al. 2019) on constructed point clouds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.training.evaluation.precision_recall import knn_radii, precision_recall


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Direct numpy transcription of the paper's definition (full distance matrices, float64)."""

    def dists(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dists(real, real), axis=1)[:, k]
    r_fake = np.sort(dists(fake, fake), axis=1)[:, k]
    precision = (dists(fake, real) <= r_real[None, :]).any(axis=1).mean()
    recall = (dists(real, fake) <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_identical_sets_give_one_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 16))
    pr = precision_recall(x, x.copy(), batch_size=17)
    assert (pr.precision, pr.recall) == (1.0, 1.0)


def test_disjoint_far_sets_give_zero_zero():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(83, 8))
    fake = rng.normal(size=(67, 8)) + 100.0
    assert tuple(precision_recall(real, fake)) == (0.0, 0.0)


def test_fake_covering_one_of_two_modes():
    # Real data has two far-apart modes; the generator reproduces one of them exactly:
    # everything it makes is realistic (precision 1) but it covers half of the real data (recall 1/2).
    rng = np.random.default_rng(2)
    mode_a = rng.normal(size=(50, 4))
    mode_b = rng.normal(size=(50, 4)) + 50.0
    real = np.concatenate([mode_a, mode_b])
    pr = precision_recall(real, mode_a.copy(), batch_size=9)
    assert pr.precision == 1.0
    assert pr.recall == 0.5
    swapped = precision_recall(mode_a.copy(), real)  # roles swapped: recall 1, precision 1/2
    assert (swapped.precision, swapped.recall) == (0.5, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_definition(k):
    rng = np.random.default_rng(3 + k)
    real = rng.normal(size=(61, 5))
    fake = rng.normal(size=(47, 5)) * 0.7 + 1.0
    expected = brute_force(real, fake, k)
    assert expected[0] not in (0.0, 1.0) and expected[1] not in (0.0, 1.0)  # a non-trivial case
    for batch_size in (1, 7, 1000):
        got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-12)


def test_knn_radii_is_the_kth_other_neighbour():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=torch.float64)
    # neighbours of 0: 1, 3, 7 -> third at distance 7; of 7: 3, 1, 0 -> 7; of 15: 7, 3, 1 -> 14
    torch.testing.assert_close(knn_radii(points, k=3, batch_size=2), torch.tensor([7.0, 6.0, 4.0, 7.0, 14.0], dtype=torch.float64))


def test_float32_and_float16_inputs():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 6)).astype(np.float32)
    fake = (rng.normal(size=(33, 6)) + 0.4).astype(np.float32)
    expected = brute_force(real.astype(np.float64), fake.astype(np.float64), 3)
    assert tuple(precision_recall(real, fake)) == pytest.approx(expected, abs=1e-12)
    half = precision_recall(torch.from_numpy(real).half(), torch.from_numpy(fake).half())
    assert half.precision == pytest.approx(expected[0], abs=0.06) and half.recall == pytest.approx(expected[1], abs=0.06)


def test_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(FlowTurboError, match="use one feature extractor"):
        precision_recall(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(FlowTurboError, match="more than 3 points"):
        precision_recall(rng.normal(size=(3, 3)), rng.normal(size=(10, 3)))
    with pytest.raises(FlowTurboError, match=r"shape \(N, D\)"):
        precision_recall(rng.normal(size=(10,)), rng.normal(size=(10, 3)))
