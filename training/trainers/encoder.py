"""Train an image encoder for an existing bundle against its FROZEN decoder (predictor and refiner untouched).

Bundles whose encoder weights were not kept (the embedded default) still need one for inpainting and
editing, and it must land in the latent space the predictor was trained on — not merely in *some* space
that the decoder inverts. Two terms, summed with weights (``latent_weight``, ``recon_weight``):

* **Latent consistency on model samples.** Pairs ``(z, D(z))``: ``z`` sampled by the bundle itself (its
  predictor + refiner under a fixed schedule, classes uniform, CFG scales from ``pairs.cfgs``) and ``D`` the
  frozen decoder. Loss ``||E(D(z)) - z||^2`` (mean over latent elements). The samples stand in for the
  latents of the lost encoder: they are what the predictor believes that encoder produced, so this term pins
  the encoder to the predictor's latent distribution (scale, channel order, spatial layout).
* **Reconstruction of real images through the frozen decoder.** Fashion-MNIST train images ``x`` (random
  horizontal flips, as the generator saw them): ``||D(E(x)) - x||^2`` (mean over pixels, the decoder's raw
  output, unclamped so saturated pixels still pass a gradient). This term makes the encoder right on real
  images, which the model samples only approximate.

The decoder is the bundle's decoder with ``decoder_variant`` active (the default bundle: ``"mse"``, its
default variant and the one every sampled image goes through). The sampled pairs are computed once and
cached in the run folder (``pairs.pt``, keyed by everything they depend on), so a resume does not resample.

Training uses :func:`flowturbo.training.trainers.common.run_training` (AdamW, EMA, budget, resume, loss
curve); the result is the EMA weights as a bundle encoder (``out_dir/encoder.safetensors`` +
``out_dir/encoder_entry.json``, the ``config.json["encoder"]`` entry) and
``out_dir/encoder.config.json`` (resolved config + summary). :func:`evaluate_round_trip` and
:func:`latent_consistency` measure the result.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo import fileio
from flowturbo.errors import FlowTurboError
from flowturbo.training.autoencoder import FlowTurboAutoencoderDecoder
from flowturbo.training.encoders import ENCODER_WEIGHTS_FILE, FlowTurboAutoencoderEncoder, LatentEncoder
from flowturbo.training.trainers.common import (
    BatchSource,
    DatasetBatches,
    LoopConfig,
    TensorBatches,
    check_run_folder,
    config_to_dict,
    run_training,
    setup_distributed,
)
from flowturbo.training.trainers.data import ImageDataConfig, load_images

PAIRS_FILE = "pairs.pt"
ENCODER_ENTRY_FILE = "encoder_entry.json"  # the bundle config.json "encoder" entry of the result
SUMMARY_FILE = "encoder.config.json"  # resolved config + what the run did (copied into the bundle's training/)
PAIRS_FORMAT = 1
PIXEL_PEAK_TO_PEAK = 2.0  # images live in [-1, 1]: PSNR = 10 log10(2^2 / MSE)
MIN_MSE = 1e-12  # floor for PSNR of a perfect reconstruction


@dataclass(frozen=True)
class PairConfig:
    """Model-sampled ``(latent, decoded image)`` pairs: how many, with which schedule, CFG scales and seed."""

    num: int = 2048
    schedule: str = "H1P5R3"
    # CFG scales, split evenly over the pairs: 1.0 is the model's own estimate of the data distribution,
    # 1.5 the default bundle's sampling guidance (what users will encode back in editing round trips).
    cfgs: tuple[float, ...] = (1.0, 1.5)
    seed: int = 20261201
    batch_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfgs", tuple(float(c) for c in self.cfgs))
        if self.num < 1 or self.batch_size < 1:
            raise FlowTurboError(f"pairs.num and pairs.batch_size must be positive, got {self.num}, {self.batch_size}")
        if not self.cfgs or any(not c >= 0 for c in self.cfgs):
            raise FlowTurboError(f"pairs.cfgs must be a non-empty list of non-negative scales, got {self.cfgs}")


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Everything ``train_encoder`` needs. ``loop.batch_size`` counts real images; ``pair_batch_size`` the
    sampled pairs in the same step (both go through one encoder forward)."""

    bundle: str
    decoder_variant: str | None = "mse"  # None: the variant the bundle's config.json selects
    data: ImageDataConfig = ImageDataConfig()
    pairs: PairConfig = PairConfig()
    loop: LoopConfig = LoopConfig(steps=600, batch_size=48, lr=1e-3, warmup_steps=50, ema_decay=0.99,
                                  ckpt_every=100, log_every=10)
    pair_batch_size: int = 48
    # Weights: the latent term is well conditioned and converges within ~100 steps whatever the weights; the
    # reconstruction term is what users see (their own images round-tripped), so it gets the larger weight.
    # Measured on the default bundle (300 steps, 1024 pairs, 1000 test images / 256 held-out samples):
    # recon_weight 4 -> 25.1 dB PSNR, latent MSE 0.0156; recon_weight 0.25 -> 24.5 dB, 0.0146. At 4 the two
    # terms are within 4x of each other in value (pixel MSE ~0.016 x 4 vs latent MSE ~0.016).
    latent_weight: float = 1.0
    recon_weight: float = 4.0

    def __post_init__(self) -> None:
        if self.pair_batch_size < 1:
            raise FlowTurboError(f"pair_batch_size must be positive, got {self.pair_batch_size}")
        if self.latent_weight < 0 or self.recon_weight < 0 or self.latent_weight + self.recon_weight == 0:
            raise FlowTurboError(
                "latent_weight and recon_weight must be >= 0 and not both 0, "
                f"got {self.latent_weight}, {self.recon_weight}"
            )


# ------------------------------------------------------------------------------------ frozen parts
def frozen_decoder(bundle_dir: str | Path, variant: str | None, device: torch.device | str = "cpu"):
    """The bundle (loaded) and its decoder with ``variant`` active, frozen (eval, no grad)."""
    from flowturbo.training.bundle import load_bundle

    bundle = load_bundle(bundle_dir, device=device)
    decoder = bundle.decoder
    if not isinstance(decoder, FlowTurboAutoencoderDecoder):
        raise FlowTurboError(
            f"train_encoder fits our autoencoder's encoder to a flowturbo_autoencoder decoder; the bundle "
            f"{bundle_dir} has a {decoder.decoder_type!r} decoder (diffusers VAEs ship their own encoder: use "
            "DiffusersVAEEncoder.from_folder)"
        )
    if variant is not None:
        decoder.set_variant(variant)
    decoder.eval().requires_grad_(False)
    return bundle, decoder


def _pairs_key(config: EncoderTrainConfig, decoder: FlowTurboAutoencoderDecoder) -> dict[str, Any]:
    root = Path(config.bundle)
    return {
        "format": PAIRS_FORMAT,
        "pairs": config_to_dict(config.pairs),
        "decoder_variant": decoder.variant,
        "bundle_files": {name: fileio.sha256_file(root / name) for name in
                         ("config.json", "predictor.safetensors", "refiner.safetensors", "decoder.safetensors")
                         if (root / name).is_file()},
    }


@torch.no_grad()
def sample_latent_pairs(bundle: Any, decoder: FlowTurboAutoencoderDecoder, pairs: PairConfig, *,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents (N, C, h, w), decoded images (N, C_img, H, W), labels (N,))`` sampled by ``bundle``.

    Classes cycle 0..K-1; pair i uses CFG scale ``pairs.cfgs[i * len(cfgs) // N]``; pair i's noise is
    image i of ``make_noise(..., seed=pairs.seed)`` (its own seed ``pairs.seed + i``). Deterministic for a given bundle and config.
    """
    from tqdm import tqdm

    from flowturbo.schedule import SamplingSchedule
    from flowturbo.training.sampling import make_noise, sample_schedule

    device = next(bundle.predictor.parameters()).device
    num_classes = bundle.num_classes
    labels = torch.arange(pairs.num) % num_classes  # (N,)
    scales = torch.tensor([pairs.cfgs[i * len(pairs.cfgs) // pairs.num] for i in range(pairs.num)])
    latents, images = [], []
    starts = list(range(0, pairs.num, pairs.batch_size))
    for start in tqdm(starts, desc="sampling encoder pairs", disable=not progress, unit="batch"):
        stop = min(start + pairs.batch_size, pairs.num)
        noise = make_noise(stop - start, bundle.latent_shape, pairs.seed, device=device, first_index=start)
        out = torch.empty_like(noise)
        for cfg in sorted(set(scales[start:stop].tolist())):  # one schedule per CFG scale in this batch
            rows = (scales[start:stop] == cfg).nonzero().squeeze(1)
            schedule = SamplingSchedule.parse(pairs.schedule, guidance_scale=cfg,
                                              guidance_channels=bundle.defaults.guidance_channels)
            result = sample_schedule(schedule, noise[rows], labels[start:stop][rows].to(device), bundle.predictor,
                                     bundle.refiner, num_classes=num_classes)
            out[rows] = result.latents
        latents.append(out.cpu())
        images.append(decoder.decode(out).cpu())
    return torch.cat(latents), torch.cat(images), labels


def load_or_sample_pairs(config: EncoderTrainConfig, bundle: Any, decoder: FlowTurboAutoencoderDecoder,
                         cache: Path | None, *, progress: bool, log: Callable[[str], None]):
    """The pairs of ``config``, from ``cache`` when its stored key matches, else sampled (and cached)."""
    key = _pairs_key(config, decoder)
    if cache is not None and cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("key_json") == json.dumps(key, sort_keys=True):
            log(f"using the {stored['latents'].shape[0]} cached pairs in {cache}")
            return stored["latents"], stored["images"], stored["labels"]
        log(f"{cache} was sampled with other settings or another bundle; resampling")
    start = time.monotonic()
    latents, images, labels = sample_latent_pairs(bundle, decoder, config.pairs, progress=progress)
    log(f"sampled {latents.shape[0]} pairs ({config.pairs.schedule}, cfg {list(config.pairs.cfgs)}) "
        f"in {time.monotonic() - start:.1f} s")
    if cache is not None:
        buffer = io.BytesIO()
        torch.save({"key_json": json.dumps(key, sort_keys=True), "latents": latents, "images": images,
                    "labels": labels}, buffer)
        fileio.atomic_write_bytes(cache, buffer.getvalue(), record=cache.parent)
    return latents, images, labels


class MixedBatches(BatchSource):
    """Each step: ``loop.batch_size`` real images (+ labels) and ``pair_batch_size`` sampled pairs.

    Two independent, exactly resumable streams (real images from a Dataset with deterministic flips,
    pairs from in-memory tensors); the state is both streams' positions.
    """

    def __init__(self, images: DatasetBatches, pairs: TensorBatches) -> None:
        self.images, self.pairs = images, pairs
        self.global_batch = images.global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.state_dict(), "pairs": self.pairs.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.images.load_state_dict(state["images"])
        self.pairs.load_state_dict(state["pairs"])

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        images, _labels = self.images.next_batch()
        latents, pair_images = self.pairs.next_batch()
        return images, latents, pair_images


def encoder_loss(encoder: nn.Module, decoder: FlowTurboAutoencoderDecoder, images: torch.Tensor,
                 latents: torch.Tensor, pair_images: torch.Tensor, latent_weight: float,
                 recon_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, latent MSE, reconstruction MSE)`` for one batch (see the module docstring)."""
    n = images.shape[0]
    predicted = encoder(torch.cat([images, pair_images]))  # (n + m, C, h, w) scaled latents, one forward
    raw = decoder.variants[decoder.variant]  # the frozen Decoder: raw latents -> unclamped images
    recon = raw(predicted[:n] / decoder.config.latent_scale)  # (n, C_img, H, W)
    recon_mse = F.mse_loss(recon.float(), images)
    latent_mse = F.mse_loss(predicted[n:].float(), latents)
    return latent_weight * latent_mse + recon_weight * recon_mse, latent_mse.detach(), recon_mse.detach()


def train_encoder(config: EncoderTrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """Fit a :class:`FlowTurboAutoencoderEncoder` to ``config.bundle``'s frozen decoder into ``out_dir``.

    Writes ``out_dir/encoder.safetensors`` + ``encoder_entry.json`` (add them to the bundle with
    :func:`flowturbo.training.encoders.add_encoder_to_bundle` or :func:`install_encoder`) and
    ``encoder.config.json`` when the run finishes; returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_run_folder(out_dir, config, resume=resume, force=force, log=lambda _m: None)
    ctx = setup_distributed(config.loop.device)
    try:
        say = log if ctx.is_main else (lambda _m: None)
        start = time.monotonic()
        bundle, decoder = frozen_decoder(config.bundle, config.decoder_variant, ctx.device)
        say(f"fitting an encoder to the frozen {decoder.variant!r} decoder of {config.bundle}")
        out_dir.mkdir(parents=True, exist_ok=True)
        pairs_cache = out_dir / PAIRS_FILE
        if ctx.is_main:
            latents, pair_images, _ = load_or_sample_pairs(config, bundle, decoder, pairs_cache,
                                                           progress=config.loop.progress, log=say)
        ctx.barrier()
        if not ctx.is_main:
            latents, pair_images, _ = load_or_sample_pairs(config, bundle, decoder, pairs_cache, progress=False,
                                                           log=say)
        sampling_s = time.monotonic() - start
        del bundle  # only the decoder is needed from here on

        source = load_images(config.data, seed=config.loop.seed)
        ae_config = decoder.config
        if (source.image_channels, source.image_size) != (ae_config.image_channels, ae_config.image_size):
            raise FlowTurboError(
                f"the decoder makes {ae_config.image_channels}x{ae_config.image_size}x{ae_config.image_size} images "
                f"but the data gives {source.image_channels}x{source.image_size}x{source.image_size}"
            )
        torch.manual_seed(config.loop.seed)
        source_info = {"method": "fitted to the frozen decoder (training/trainers/encoder.py)",
                       "decoder_variant": decoder.variant, "training_config": f"training/{SUMMARY_FILE}"}
        model = FlowTurboAutoencoderEncoder(ae_config, source_info)
        image_batches = DatasetBatches(source.dataset, config.loop.batch_size, ctx, config.loop.seed,
                                       config.loop.num_workers)
        pair_batches = TensorBatches([latents, pair_images], config.pair_batch_size, ctx, config.loop.seed + 1)
        lw, rw = config.latent_weight, config.recon_weight

        def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            images, z, z_images = batch
            return encoder_loss(net, decoder, images, z, z_images, lw, rw)[0]

        train_start = time.monotonic()
        result = run_training(
            out_dir=out_dir, config=config, loop=config.loop, model=model, step_fn=step,
            batches=MixedBatches(image_batches, pair_batches), ctx=ctx, resume=resume, force=force,
            title="encoder", log=log, extra_state={"autoencoder_config": ae_config.to_dict()},
        )
        if not result.finished:
            return out_dir
        if ctx.is_main:
            encoder: FlowTurboAutoencoderEncoder = result.ema.to("cpu").eval()  # type: ignore[assignment]
            encoder.save_to_bundle(out_dir)
            fileio.add_owned(out_dir, [out_dir / ENCODER_WEIGHTS_FILE])
            fileio.atomic_write_json(out_dir / ENCODER_ENTRY_FILE, encoder.bundle_config(), record=out_dir)
            fileio.atomic_write_json(out_dir / SUMMARY_FILE, {
                "config": config_to_dict(config),
                "encoder": encoder.bundle_config(),
                "steps": result.step,
                "final_loss": result.losses[-1] if result.losses else None,
                "num_pairs": int(latents.shape[0]),
                "sampling_s": round(sampling_s, 1),
                "training_s": round(time.monotonic() - train_start, 1),
                "device": str(ctx.device),
                "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
            }, record=out_dir)
            say(f"wrote {out_dir / ENCODER_WEIGHTS_FILE}")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


def trained_encoder(out_dir: str | Path) -> FlowTurboAutoencoderEncoder:
    """The encoder a finished :func:`train_encoder` run wrote (strictly loaded)."""
    out_dir = Path(out_dir)
    entry_path = out_dir / ENCODER_ENTRY_FILE
    if not entry_path.is_file():
        raise FlowTurboError(f"{out_dir} holds no finished encoder ({ENCODER_ENTRY_FILE}); train or resume it first")
    entry = json.loads(entry_path.read_text())
    return FlowTurboAutoencoderEncoder.from_bundle(out_dir, entry)


# ------------------------------------------------------------------------------------- measurement
def psnr(reconstructed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (N,) of images in [-1, 1] (peak-to-peak 2; the same number as for [0, 1] images)."""
    mse = (reconstructed.double() - reference.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(PIXEL_PEAK_TO_PEAK**2 / mse.clamp_min(MIN_MSE))


@torch.no_grad()
def round_trip(encoder: LatentEncoder, decoder: Any, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``decode(encode(images))`` in batches (images (N, C, H, W) in [-1, 1])."""
    out = [decoder.decode(encoder.encode(images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def latent_consistency(encoder: LatentEncoder, decoder: Any, latents: torch.Tensor,
                       batch_size: int = 500) -> dict[str, float]:
    """``encode(decode(z))`` against ``z``: MSE, the variance of ``z`` (so MSE / var is the unexplained
    fraction) and the mean per-latent cosine similarity."""
    back = torch.cat([encoder.encode(decoder.decode(latents[i : i + batch_size]))
                      for i in range(0, latents.shape[0], batch_size)])
    diff = (back.double() - latents.double())
    var = float(latents.double().var())
    mse = float(diff.square().mean())
    cos = F.cosine_similarity(back.double().flatten(1), latents.double().flatten(1), dim=1).mean()
    return {"mse": mse, "latent_var": var, "relative_mse": mse / var, "cosine": float(cos),
            "num_latents": int(latents.shape[0])}


def evaluate_round_trip(encoder: LatentEncoder, decoder: Any, images: torch.Tensor, labels: torch.Tensor, *,
                        features: Any, reference: Any = None, progress: bool = False) -> dict[str, Any]:
    """PSNR of ``decode(encode(x))`` vs ``x`` and the FID / precision / recall / class accuracy of the
    round-tripped images (``flowturbo.training.evaluation.evaluate_samples``; ``reference`` None = the
    Fashion-MNIST test split through ``features``)."""
    from flowturbo.training.evaluation import evaluate_samples

    recon = round_trip(encoder, decoder, images)
    values = psnr(recon, images)
    metrics = evaluate_samples(recon, labels, features=features, reference=reference, progress=progress)
    mse = float((recon.double() - images.double()).square().mean())
    return {
        "num_images": int(images.shape[0]),
        "psnr_db_mean": float(values.mean()),
        "psnr_db_median": float(values.median()),
        "psnr_db_of_mean_mse": 10.0 * math.log10(PIXEL_PEAK_TO_PEAK**2 / max(mse, MIN_MSE)),
        "pixel_mse": mse,
        "fid": metrics["fid"],
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "class_accuracy": metrics.get("class_accuracy"),
        "features": metrics["features"],
        "num_reference": metrics["num_reference"],
    }


__all__ = [
    "EncoderTrainConfig",
    "MixedBatches",
    "PairConfig",
    "encoder_loss",
    "evaluate_round_trip",
    "frozen_decoder",
    "latent_consistency",
    "load_or_sample_pairs",
    "psnr",
    "round_trip",
    "sample_latent_pairs",
    "train_encoder",
    "trained_encoder",
]
