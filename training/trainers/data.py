"""Training data for the trainers: image sources and the latents a generator learns on.

Images come from Fashion-MNIST (``dataset="fashion-mnist"``, padded to 32x32) or from an ImageNet-layout
folder (any other value of ``dataset``: a path). Latents come from our own autoencoder (a run folder of
``train autoencoder`` or its ``autoencoder.safetensors``) or from a diffusers ``AutoencoderKL`` folder
(sd-vae-ft-ema / sd-vae-ft-mse, for ImageNet users). Both encoders return *scaled* latents, the posterior
mean times the latent scale, so the latents a generator sees are a deterministic function of the image.

``pre_encode=True`` encodes the whole dataset once into an in-memory tensor (mirrored copies included when
``random_flip``), cached in the run folder; ``pre_encode=False`` encodes every batch on the fly (for image
folders too large to hold as latents).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import sha256_file
from flowturbo.training.autoencoder import FlowTurboAutoencoder
from flowturbo.training.encoders import (
    AUTOENCODER_FILE,
    DiffusersVAEEncoder,
    FlowTurboAutoencoderEncoder,
    read_autoencoder_file,
)
from flowturbo.training.encoders import LatentEncoder as _BundleEncoder
from flowturbo.training.image_folder import ImageFolderDataset, deterministic_flip
from flowturbo.training.trainers.common import (
    BatchSource,
    DatasetBatches,
    DistContext,
    TensorBatches,
    atomic_torch_save,
)

FASHION_MNIST = "fashion-mnist"
LATENT_CACHE_FILE = "latents.pt"


@dataclass(frozen=True)
class ImageDataConfig:
    """Where training images come from.

    ``dataset``: ``"fashion-mnist"`` or the path of an ImageNet-layout folder (``root/<class>/*.png``).
    ``limit``: use only the first N images (quick experiments, tests). ``image_size`` / ``image_channels``
    apply to folders (center crop resolution; 1 = grayscale, 3 = RGB); Fashion-MNIST is always 1x32x32.
    """

    dataset: str = FASHION_MNIST
    split: str = "train"  # Fashion-MNIST split
    fashion_mnist_root: str | None = None  # None: the Debian package's folder
    limit: int | None = None
    image_size: int = 32
    image_channels: int = 1
    random_flip: bool = True


@dataclass(frozen=True)
class LatentDataConfig:
    """Images plus the encoder that turns them into the latents a generator is trained on.

    Exactly one of ``autoencoder`` (our autoencoder: run folder or ``autoencoder.safetensors``), ``vae``
    (a diffusers AutoencoderKL folder) and ``encoder_bundle`` (a sampling bundle folder: the image encoder it
    carries for inpainting, e.g. the embedded default's, to train a refiner for a bundle's predictor) must be set.
    """

    images: ImageDataConfig = ImageDataConfig()
    autoencoder: str | None = None
    vae: str | None = None
    encoder_bundle: str | None = None
    vae_latent_scale: float | None = None  # None: the VAE config's scaling_factor (0.18215 for SD-VAE)
    pre_encode: bool = True
    encode_batch_size: int = 256


# ------------------------------------------------------------------------------------------ images
class ImageSource:
    """A dataset of ``(image (C, S, S) in [-1, 1], label)`` plus its class names."""

    def __init__(self, dataset: Dataset, class_names: list[str], image_channels: int, image_size: int) -> None:
        self.dataset = dataset
        self.class_names = class_names
        self.image_channels = image_channels
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def load_images(config: ImageDataConfig, seed: int = 0) -> ImageSource:
    """Open the images of ``config`` (Fashion-MNIST in memory, folders lazily)."""
    if config.dataset == FASHION_MNIST:
        from flowturbo.training import fashion_mnist as fm

        root = config.fashion_mnist_root or fm.DEFAULT_ROOT
        arrays = fm.load_fashion_mnist(config.split, root, limit=config.limit)
        images = fm.to_model_range(arrays.images)  # (N, 1, 32, 32) float32
        labels = torch.as_tensor(arrays.labels, dtype=torch.int64)  # (N,)
        dataset: Dataset = _FlippableTensors(images, labels, config.random_flip, seed)
        return ImageSource(dataset, list(fm.CLASS_NAMES), 1, fm.PADDED_SIZE)
    folder = ImageFolderDataset(
        config.dataset, config.image_size, channels=config.image_channels, random_flip=config.random_flip, seed=seed
    )
    dataset = folder
    if config.limit is not None:
        dataset = _Subset(folder, config.limit)
    return ImageSource(dataset, folder.class_names, config.image_channels, config.image_size)


class _FlippableTensors(Dataset):
    """In-memory images with the same deterministic per-(epoch, index) flips as ImageFolderDataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool, seed: int) -> None:
        self.images, self.labels = images, labels
        self.random_flip, self.seed, self.epoch = random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def is_flipped(self, index: int) -> bool:
        return self.random_flip and deterministic_flip(self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (image.flip(-1) if self.is_flipped(index) else image), self.labels[index]


class _Subset(Dataset):
    def __init__(self, dataset: Any, limit: int) -> None:
        if limit < 1:
            raise FlowTurboError(f"limit must be a positive number of images, got {limit}")
        self.dataset, self.size = dataset, min(limit, len(dataset))

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def unflipped_tensors(source: ImageSource, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, S, S) and labels (N,) of a source, without flips (for statistics, pre-encoding)."""
    dataset = source.dataset
    if isinstance(dataset, _FlippableTensors):
        return dataset.images, dataset.labels
    images, labels = [], []
    for batch_images, batch_labels in _ordered_loader(dataset, batch_size, flipped=False):
        images.append(batch_images)
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(images), torch.cat(labels)


class _FixedFlip(Dataset):
    """View of a dataset with every item mirrored (``mirror=True``) or none (undoes random flips)."""

    def __init__(self, dataset: Any, mirror: bool) -> None:
        self.dataset, self.mirror = dataset, mirror

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.dataset[index]
        if self.dataset_flipped(index) != self.mirror:
            image = image.flip(-1)
        return image, label

    def dataset_flipped(self, index: int) -> bool:
        inner = self.dataset.dataset if isinstance(self.dataset, _Subset) else self.dataset
        return bool(inner.is_flipped(index)) if hasattr(inner, "is_flipped") else False


def _ordered_loader(dataset: Any, batch_size: int, flipped: bool, num_workers: int = 0) -> DataLoader:
    return DataLoader(_FixedFlip(dataset, flipped), batch_size=batch_size, shuffle=False, num_workers=num_workers)


# ---------------------------------------------------------------------------------------- encoders
# One implementation of "images -> scaled latents": the bundle-facing encoders of flowturbo.training.encoders
# (our autoencoder's encoder: posterior mean x latent_scale; a diffusers AutoencoderKL: latent_dist.mean x scale).
LatentEncoder = _BundleEncoder


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[FlowTurboAutoencoder, dict]:
    """Our autoencoder (EMA encoder + EMA decoder) and the extra decoder variants, from a run folder or file.

    Returns ``(model, {variant: decoder state dict})``.
    """
    file, config, tensors = read_autoencoder_file(path)
    model = FlowTurboAutoencoder(config)
    from flowturbo.training.checkpoints import strict_load

    own = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "decoder."))}
    strict_load(model, own, f"flowturbo autoencoder from {file}")
    variants: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("decoder_"):
            variant, _, rest = key[len("decoder_"):].partition(".")
            variants.setdefault(variant, {})[rest] = value
    return model.to(device).eval(), variants


def load_diffusers_vae(path: str | Path, device: torch.device | str, latent_scale: float | None) -> _BundleEncoder:
    """A diffusers AutoencoderKL folder (offline) as a latent encoder (``latent_scale`` None: its config's
    ``scaling_factor``)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers AutoencoderKL folder (no config.json)")
    if latent_scale is None:
        try:
            latent_scale = float(json.loads((folder / "config.json").read_text()).get("scaling_factor", 0.18215))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from None
    return DiffusersVAEEncoder.from_folder(folder, device=device, latent_scale=latent_scale).requires_grad_(False)


def load_encoder(config: LatentDataConfig, device: torch.device | str) -> _BundleEncoder:
    """The latent encoder named by ``config`` (exactly one of ``autoencoder`` / ``vae`` / ``encoder_bundle``)."""
    if sum(source is not None for source in (config.autoencoder, config.vae, config.encoder_bundle)) != 1:
        raise FlowTurboError(
            "give exactly one latent encoder: --autoencoder (a `train autoencoder` run), --vae (a diffusers "
            "AutoencoderKL folder) or --encoder-bundle (a bundle folder with an encoder)"
        )
    if config.autoencoder is not None:
        encoder = FlowTurboAutoencoderEncoder.from_autoencoder_file(config.autoencoder)
        return encoder.to(device).eval().requires_grad_(False)
    if config.encoder_bundle is not None:
        from flowturbo.training.encoders import load_encoder as load_bundle_encoder

        found = load_bundle_encoder(config.encoder_bundle, device=device)
        if found is None:
            raise FlowTurboError(f"--encoder-bundle {config.encoder_bundle} has no encoder (its config.json has no "
                                 "'encoder' entry); give --autoencoder or --vae instead")
        return found.requires_grad_(False)
    return load_diffusers_vae(config.vae, device, config.vae_latent_scale)  # type: ignore[arg-type]


def check_encoder_fits_images(encoder: Any, source: ImageSource) -> None:
    if encoder.image_channels != source.image_channels:
        raise FlowTurboError(
            f"the encoder takes {encoder.image_channels}-channel images but the data has {source.image_channels} "
            f"channels; set --image-channels {encoder.image_channels}"
        )
    if source.image_size % encoder.downsample_factor:
        raise FlowTurboError(
            f"image size {source.image_size} is not divisible by the encoder's downsample factor "
            f"{encoder.downsample_factor}"
        )


@torch.no_grad()
def encode_dataset(encoder: Any, source: ImageSource, device: torch.device, mirrored: bool,
                   batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image once (and its mirror image when ``mirrored``): latents (M, L, s, s), labels (M,)."""
    latents, labels = [], []
    for flip in (False, True) if mirrored else (False,):
        for images, batch_labels in _ordered_loader(source.dataset, batch_size, flip, num_workers):
            latents.append(encoder.encode(images.to(device)).float().cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    return torch.cat(latents), torch.cat(labels)


@dataclass
class LatentData:
    """What a generator trainer needs: a batch source of ``(latents, labels)`` and the data's description."""

    batches: BatchSource
    latent_shape: tuple[int, int, int]  # (L, s, s)
    num_classes: int
    class_names: list[str]
    encode_on_the_fly: Any | None  # the encoder when batches are images, else None


def _cache_key(config: LatentDataConfig, num_images: int) -> str:
    """What the cached latents depend on: the data config, the image count and the encoder's weight bytes.

    (Edits inside an image folder that keep the count are not detected: delete ``latents.pt`` after them.)
    """
    blob = json.dumps({"images": dataclasses.asdict(config.images), "num_images": num_images,
                       "autoencoder": config.autoencoder, "vae": config.vae, "encoder_bundle": config.encoder_bundle,
                       "vae_latent_scale": config.vae_latent_scale, "encoder": _encoder_fingerprint(config)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _encoder_fingerprint(config: LatentDataConfig) -> list[str]:
    """sha256 of the encoder's files (our autoencoder file, or the VAE folder's config + weights)."""
    if config.autoencoder is not None:
        path = Path(config.autoencoder)
        files = [path / AUTOENCODER_FILE if path.is_dir() else path]
    elif config.encoder_bundle is not None:
        folder = Path(config.encoder_bundle)  # its config.json (the encoder entry) and every weights file
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    else:
        folder = Path(config.vae or "")
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return [sha256_file(f) for f in files if f.is_file()]


def _read_cache(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def prepare_latent_data(config: LatentDataConfig, *, global_batch: int, ctx: DistContext, seed: int,
                        cache_dir: Path | None, num_workers: int = 0, log: Any = print) -> LatentData:
    """Open the images and the encoder; pre-encode (cached in ``cache_dir``) or stream batches of images."""
    source = load_images(config.images, seed)
    encoder = load_encoder(config, ctx.device)
    check_encoder_fits_images(encoder, source)
    size = source.image_size // encoder.downsample_factor
    latent_shape = (int(encoder.latent_channels), size, size)
    if not config.pre_encode:
        batches = DatasetBatches(source.dataset, global_batch, ctx, seed, num_workers)
        return LatentData(batches, latent_shape, source.num_classes, source.class_names, encoder)
    key = _cache_key(config, len(source))
    cache = cache_dir / LATENT_CACHE_FILE if cache_dir is not None else None
    hit = ctx.is_main and cache is not None and cache.is_file() and _read_cache(cache).get("key") == key
    if ctx.distributed:
        decision = [hit]
        torch.distributed.broadcast_object_list(decision, src=0)  # rank 0 decides: no race on the file
        hit = bool(decision[0])
    if not hit and (ctx.is_main or cache is None):
        if ctx.is_main:
            mirrored = " and their mirror images" if config.images.random_flip else ""
            log(f"encoding {len(source)} images{mirrored} to latents once")
        latents, labels = encode_dataset(encoder, source, ctx.device, config.images.random_flip,
                                         config.encode_batch_size, num_workers)
        if cache is not None:
            atomic_torch_save({"key": key, "latents": latents, "labels": labels}, cache, record=cache_dir)
    if cache is not None:
        ctx.barrier()  # the cache is complete before anyone reads it
        if hit or not ctx.is_main:
            cached = _read_cache(cache)
            latents, labels = cached["latents"], cached["labels"]
    del encoder
    batches = TensorBatches((latents, labels), global_batch, ctx, seed)
    return LatentData(batches, latent_shape, source.num_classes, source.class_names, None)


__all__ = [
    "AUTOENCODER_FILE",
    "ImageDataConfig",
    "LatentData",
    "LatentDataConfig",
    "encode_dataset",
    "load_autoencoder",
    "load_encoder",
    "load_images",
    "prepare_latent_data",
    "unflipped_tensors",
]
