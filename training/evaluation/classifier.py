"""A small CNN Fashion-MNIST classifier: the domain feature extractor for FID and the class-accuracy judge.

Input (N, 1, 32, 32) in [-1, 1] (see ``flowturbo.training.fashion_mnist``). Three stages of two 3x3
conv-BN-ReLU layers with 2x max pooling (32 -> 16 -> 8 -> 4), global average pooling, then a linear
embedding (``features``, the penultimate layer used for FID / precision / recall) and a linear head.

Trained with AdamW + cosine learning rate and random horizontal flips. Measured on one H100 (torch 2.11):
the defaults (~80k parameters, 6 epochs) reach 91.7% test accuracy in 16 s including CUDA start-up;
``widths=(32, 64, 128)`` reaches 93.0% in 10 s (4x the CPU cost). On two CPU cores the default costs about
a minute per epoch.

Saved as ``classifier.safetensors`` + ``classifier.json`` (config and training summary), written atomically.

CLI: ``python -m flowturbo.training.evaluation.classifier_cli --out DIR [--epochs N] [--device cuda]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import atomic_path, atomic_write_json
from flowturbo.training.fashion_mnist import (
    DEFAULT_ROOT,
    NUM_CLASSES,
    PADDED_SIZE,
    FashionMNISTArrays,
    load_fashion_mnist,
    pad_images,
    uint8_to_unit_range,
)

WEIGHTS_FILENAME = "classifier.safetensors"
CONFIG_FILENAME = "classifier.json"
FORMAT_VERSION = 1
EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`FashionClassifier`."""

    in_channels: int = 1
    image_size: int = PADDED_SIZE
    num_classes: int = NUM_CLASSES
    widths: tuple[int, ...] = (16, 32, 64)  # channels per stage; each stage halves the resolution
    embed_dim: int = 128  # size of the penultimate ``features`` embedding
    dropout: float = 0.2

    def __post_init__(self) -> None:
        downsample = 2 ** len(self.widths)
        if self.image_size % downsample:
            raise FlowTurboError(f"image_size {self.image_size} must be divisible by 2**len(widths) = {downsample}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"classifier config has unknown keys {sorted(unknown)}; was it written by a newer flowturbo?")
        data = dict(data)
        if "widths" in data:
            data["widths"] = tuple(data["widths"])
        return cls(**data)


@dataclass(frozen=True)
class TrainClassifierConfig:
    """Hyper-parameters of :func:`train_classifier`."""

    epochs: int = 6
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    hflip: bool = True  # random left-right flips (clothes are roughly mirror-symmetric)
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images (tests, quick runs)
    test_limit: int | None = None


@dataclass
class ClassifierTrainingResult:
    """What :func:`train_classifier` returns: the trained model (eval mode) and its numbers."""

    model: "FashionClassifier"
    test_accuracy: float
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    step_losses: list[float] = field(default_factory=list)  # every optimisation step


class _ConvStage(nn.Module):
    """Two 3x3 conv-BN-ReLU layers then 2x max pooling: (N, C_in, H, W) -> (N, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FashionClassifier(nn.Module):
    """Small CNN: ``features(x)`` (N, embed_dim) and ``forward(x)`` / ``logits(x)`` (N, num_classes)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.widths)
        self.stages = nn.Sequential(*[_ConvStage(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.embed = nn.Linear(config.widths[-1], config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise FlowTurboError(f"classifier expects images of shape (N, {c}, {s}, {s}) in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (pre-activation): (N, 1, 32, 32) -> (N, embed_dim)."""
        self._check_input(x)
        h = self.stages(x)  # (N, C, 4, 4)
        h = h.mean(dim=(2, 3))  # (N, C)
        return self.embed(h)  # (N, embed_dim)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) -> (N, num_classes)."""
        return self.head(self.dropout(F.relu(feats)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.logits_from_features(self.features(x))

    logits = forward


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Identifies a classifier's exact weights, so caches keyed by it change when the weights change.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # 1-d: 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def classifier_accuracy(
    model: FashionClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
) -> float:
    """Top-1 accuracy of ``model`` on float images (N, 1, 32, 32) in [-1, 1] against labels (N,)."""
    if images.shape[0] != labels.shape[0]:
        raise FlowTurboError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / max(images.shape[0], 1)


def train_classifier(
    config: TrainClassifierConfig = TrainClassifierConfig(),
    *,
    model_config: ClassifierConfig = ClassifierConfig(),
    root: str | Path = DEFAULT_ROOT,
    device: str | torch.device | None = None,
    train_data: FashionMNISTArrays | None = None,
    test_data: FashionMNISTArrays | None = None,
    progress: bool = True,
) -> ClassifierTrainingResult:
    """Train a :class:`FashionClassifier` on Fashion-MNIST and report its test accuracy.

    The whole split lives on ``device`` as uint8 (60k x 1 KiB); batches are drawn by a seeded permutation,
    so a run is reproducible for a given seed and device. ``train_data`` / ``test_data`` replace the
    files under ``root`` (tests pass tiny slices).
    """
    dev = _resolve_device(device)
    torch.manual_seed(config.seed)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    if train_data is None:
        train_data = load_fashion_mnist("train", root, limit=config.train_limit)
    if test_data is None:
        test_data = load_fashion_mnist("test", root, limit=config.test_limit)

    train_x = pad_images(train_data.images).to(dev)  # (N, 1, 32, 32) uint8
    train_y = torch.as_tensor(train_data.labels, dtype=torch.int64).to(dev)  # (N,)
    test_x = uint8_to_unit_range(pad_images(test_data.images))  # (M, 1, 32, 32) float32, on CPU
    test_y = torch.as_tensor(test_data.labels, dtype=torch.int64)

    model = FashionClassifier(model_config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    )

    result = ClassifierTrainingResult(model=model, test_accuracy=float("nan"))
    bar = tqdm(total=total_steps, desc="classifier", disable=not progress, unit="step")
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        epoch_loss = torch.zeros((), device=dev)
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            x = uint8_to_unit_range(train_x[idx])  # (B, 1, 32, 32)
            if config.hflip:
                flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(dev)  # (B,)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_loss += loss.detach() * idx.shape[0]
            result.step_losses.append(float(loss.detach()))
            bar.update(1)
        result.epoch_losses.append(float(epoch_loss) / n)
        bar.set_postfix(epoch=epoch + 1, loss=f"{result.epoch_losses[-1]:.4f}")
    bar.close()

    model.eval()
    result.test_accuracy = classifier_accuracy(model, test_x, test_y)
    if progress:
        tqdm.write(f"classifier test accuracy: {result.test_accuracy:.4f} on {test_x.shape[0]} images")
    return result


def save_classifier(
    model: FashionClassifier,
    directory: str | Path,
    *,
    metadata: dict | None = None,
) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` into ``directory`` (atomically); return it."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILENAME) as tmp:
        save_file(state, str(tmp))
    info = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "weights_sha256": weights_hash(model),
        "metadata": metadata or {},
    }
    atomic_write_json(directory / CONFIG_FILENAME, info)
    return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier written by :func:`save_classifier` (eval mode) onto ``device``."""
    directory = Path(directory)
    weights_path, config_path = directory / WEIGHTS_FILENAME, directory / CONFIG_FILENAME
    for path in (weights_path, config_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found; train a classifier with "
                f"`python -m flowturbo.training.evaluation.classifier_cli --out {directory}`"
            )
    try:
        info = json.loads(config_path.read_text())
        config = ClassifierConfig.from_dict(info["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path} is not a classifier config ({exc}); re-save the classifier") from exc
    model = FashionClassifier(config)
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:  # bad file / key or shape mismatch
        raise CheckpointError(f"{weights_path} does not match the config in {config_path}: {exc}") from exc
    return model.to(device).eval()
