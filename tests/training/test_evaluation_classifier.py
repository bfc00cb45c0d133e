"""The Fashion-MNIST domain classifier: shapes, a tiny training run, save / load, weights hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.evaluation.classifier import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    ClassifierConfig,
    FashionClassifier,
    TrainClassifierConfig,
    load_classifier,
    save_classifier,
    train_classifier,
    weights_hash,
)
from flowturbo.training.evaluation.classifier_cli import main as classifier_cli
from flowturbo.training.fashion_mnist import FashionMNISTArrays, write_idx

TINY = ClassifierConfig(widths=(8, 16, 16), embed_dim=12)


def striped_data(n: int, seed: int) -> FashionMNISTArrays:
    """Learnable synthetic 'clothes': class c is a bright bar at rows 2c..2c+3, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 80, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 2 : 2 * c + 6, 4:24] += 170
    return FashionMNISTArrays(images=images.astype(np.uint8), labels=labels.astype(np.int64))


def test_forward_shapes(seeded):
    model = FashionClassifier().eval()
    x = torch.rand(5, 1, 32, 32, generator=seeded) * 2 - 1
    logits, feats = model(x), model.features(x)
    assert logits.shape == (5, 10) and feats.shape == (5, 128)
    torch.testing.assert_close(model.logits(x), logits, **tol(torch.float32))
    torch.testing.assert_close(model.logits_from_features(feats), logits, **tol(torch.float32))
    with pytest.raises(FlowTurboError, match=r"\(N, 1, 32, 32\)"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(FlowTurboError, match="divisible"):
        ClassifierConfig(image_size=36)


def test_tiny_training_run_lowers_the_loss():
    result = train_classifier(
        TrainClassifierConfig(epochs=6, batch_size=32, lr=1e-2, seed=3),
        model_config=TINY,
        device="cpu",
        train_data=striped_data(192, seed=0),
        test_data=striped_data(61, seed=1),
        progress=False,
    )
    assert len(result.epoch_losses) == 6 and len(result.step_losses) == 6 * 6
    assert result.epoch_losses[-1] < 0.6 * result.epoch_losses[0]
    assert result.test_accuracy > 0.5  # chance is 0.1
    assert not result.model.training


def test_training_is_reproducible_for_a_seed():
    kwargs = dict(model_config=TINY, device="cpu", train_data=striped_data(40, 0), test_data=striped_data(9, 1), progress=False)
    a = train_classifier(TrainClassifierConfig(epochs=1, batch_size=16, seed=7), **kwargs)
    b = train_classifier(TrainClassifierConfig(epochs=1, batch_size=16, seed=7), **kwargs)
    c = train_classifier(TrainClassifierConfig(epochs=1, batch_size=16, seed=8), **kwargs)
    assert a.step_losses == b.step_losses and weights_hash(a.model) == weights_hash(b.model)
    assert weights_hash(a.model) != weights_hash(c.model)


def test_save_load_round_trip(tmp_path, seeded):
    model = FashionClassifier(TINY).eval()
    with torch.no_grad():  # make BN running statistics non-default so buffers are exercised too
        model.stages[0].body[1].running_mean.uniform_(-1, 1, generator=seeded)
    out = save_classifier(model, tmp_path / "clf", metadata={"test_accuracy": 0.5})
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILENAME, CONFIG_FILENAME])
    info = json.loads((out / CONFIG_FILENAME).read_text())
    assert info["config"]["widths"] == [8, 16, 16] and info["metadata"]["test_accuracy"] == 0.5
    assert info["weights_sha256"] == weights_hash(model)

    loaded = load_classifier(out)
    assert loaded.config == TINY and not loaded.training
    assert weights_hash(loaded) == weights_hash(model)
    x = torch.rand(3, 1, 32, 32, generator=seeded) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), **tol(torch.float32))


def test_weights_hash_changes_with_any_weight():
    model = FashionClassifier(TINY)
    before = weights_hash(model)
    assert weights_hash(model) == before
    with torch.no_grad():
        model.head.bias[3] += 1e-3
    after = weights_hash(model)
    assert after != before
    model.stages[1].body[1].num_batches_tracked += 1  # buffers count too
    assert weights_hash(model) != after


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="flowturbo.training.evaluation.classifier_cli --out"):
        load_classifier(tmp_path / "missing")
    folder = save_classifier(FashionClassifier(TINY), tmp_path / "clf")
    info = json.loads((folder / CONFIG_FILENAME).read_text())
    info["config"]["embed_dim"] = 20
    (folder / CONFIG_FILENAME).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not match"):
        load_classifier(folder)
    info["config"]["colour"] = "red"
    (folder / CONFIG_FILENAME).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="unknown keys"):
        load_classifier(folder)


def test_cli_trains_and_saves(tmp_path, capsys):
    root = tmp_path / "fmnist"
    for prefix, data in (("train", striped_data(24, 0)), ("t10k", striped_data(7, 1))):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", data.images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", data.labels.astype(np.uint8))
    out = tmp_path / "clf"
    argv = ["--out", str(out), "--root", str(root), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert classifier_cli(argv) == 0
    assert "test accuracy" in capsys.readouterr().out
    info = json.loads((out / CONFIG_FILENAME).read_text())
    assert info["metadata"]["train"]["epochs"] == 1 and 0.0 <= info["metadata"]["test_accuracy"] <= 1.0
    assert load_classifier(out).config == ClassifierConfig()
    assert classifier_cli(["--out", str(out), "--root", str(tmp_path / "none"), "--device", "cpu"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
