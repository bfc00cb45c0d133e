"""Trainers: each is a function over a frozen config dataclass that returns its output folder.

* :func:`train_autoencoder` — our KL autoencoder + the "mse" decoder fine-tune (``autoencoder.py``)
* :func:`train_predictor` — a SiT predictor by linear-path flow matching on latents (``predictor.py``)
* :func:`train_refiner` — a FlowTurbo velocity refiner against a frozen teacher (``refiner.py``)
* :func:`train_text_refiner` — a refiner for a diffusers text-to-image teacher, on its own trajectories
  (``text_refiner.py``)
* :func:`package_bundle` — trained parts (EMA weights) -> a sampling bundle (``package.py``)

The loop they share (AdamW, EMA, bf16 autocast on CUDA, grad clipping, exact resume, DDP, NaN stop,
time budget, progress bar, loss curve) is :func:`flowturbo.training.trainers.common.run_training`.
"""

from __future__ import annotations

from flowturbo.training.trainers.autoencoder import (
    AUTOENCODER_TRAIN_PRESETS,
    AutoencoderTrainConfig,
    autoencoder_decoder,
    train_autoencoder,
)
from flowturbo.training.trainers.common import LoopConfig, TrainResult, run_training
from flowturbo.training.trainers.data import ImageDataConfig, LatentDataConfig, load_autoencoder
from flowturbo.training.trainers.package import package_bundle
from flowturbo.training.trainers.predictor import PREDICTOR_TRAIN_PRESETS, PredictorTrainConfig, train_predictor
from flowturbo.training.trainers.refiner import REFINER_TRAIN_PRESETS, RefinerTrainConfig, train_refiner
from flowturbo.training.trainers.text_refiner import (
    TEXT_REFINER_TRAIN_PRESETS,
    TextRefinerTrainConfig,
    train_text_refiner,
)

__all__ = [
    "AUTOENCODER_TRAIN_PRESETS",
    "AutoencoderTrainConfig",
    "ImageDataConfig",
    "LatentDataConfig",
    "LoopConfig",
    "PREDICTOR_TRAIN_PRESETS",
    "PredictorTrainConfig",
    "REFINER_TRAIN_PRESETS",
    "RefinerTrainConfig",
    "TEXT_REFINER_TRAIN_PRESETS",
    "TextRefinerTrainConfig",
    "TrainResult",
    "autoencoder_decoder",
    "load_autoencoder",
    "package_bundle",
    "run_training",
    "train_autoencoder",
    "train_predictor",
    "train_refiner",
    "train_text_refiner",
]
