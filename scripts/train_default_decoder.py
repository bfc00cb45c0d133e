#!/usr/bin/env python3
"""Train the embedded default's "ema" decoder variant as long as its "mse" variant, install it, measure both.

Why (issue 20, item 4): the seed report's decoder swap (sd-vae-ft-ema vs sd-vae-ft-mse) asks what the decoder's
fine-tuning objective does to samples. In the shipped default the two variants were not comparable: "ema" was
the stage-1 autoencoder's EMA decoder after 910 steps, "mse" the same decoder fine-tuned 1500 more steps on pixel
MSE (training/trainers/autoencoder.py), so "ema vs mse" measured training length (domain FID 84 vs 16). Here the
"ema" variant is fine-tuned from those same stage-1 weights for the same 1500 steps at the same batch (512) and
lr (1e-4) as "mse", but with the stage-1 reconstruction objective (L1), keeping its EMA weights — as sd-vae-ft-ema
is the EMA of a fine-tune with the original objective and -mse a fine-tune towards MSE. The bundle's encoder
(fitted to the "mse" decoder, training/trainers/encoder.py) is frozen and gives the latents, so both variants
decode the same latent space the predictor samples.

    .venv/bin/python scripts/train_default_decoder.py                  # train + install the new "ema" variant
    .venv/bin/python scripts/train_default_decoder.py --eval-only      # round trip of both variants

Writes the run into ``--run-dir``, installs ``decoder.safetensors`` (the "mse" variant untouched),
``training/decoder_ema.config.json`` and ``training/decoder_ema.loss_curve.png`` into the bundle, and prints the
round-trip PSNR / domain FID of both variants on the Fashion-MNIST test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "runtime" / "assets" / "default_model"
DECODER_FILE = "decoder.safetensors"


@dataclasses.dataclass(frozen=True)
class DecoderFinetuneConfig:
    """The fine-tune of one decoder variant against the bundle's frozen encoder."""

    bundle: str
    variant: str = "ema"  # the variant trained (and replaced)
    start_from: str = "ema"  # the variant whose weights it starts from
    recon_loss: str = "l1"  # the stage-1 objective's reconstruction term
    loop: object = None  # LoopConfig (typed loosely: built in main, after the imports)


class FrozenEncoderDecoder(nn.Module):
    """A frozen bundle encoder (scaled latents, divided back to raw) feeding a trainable decoder network."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_scale: float) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.decoder = decoder
        self.latent_scale = float(latent_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.encoder.encode(images) / self.latent_scale  # (N, L, s, s) raw latents
        return self.decoder(z)  # (N, C, H, W)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle folder (default: the embedded default)")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "default_decoder_ema"), help="training run folder")
    p.add_argument("--steps", type=int, default=1500, help="as the 'mse' fine-tune (model_card.json)")
    p.add_argument("--batch-size", type=int, default=512, help="as the 'mse' fine-tune")
    p.add_argument("--lr", type=float, default=1e-4, help="as the 'mse' fine-tune")
    p.add_argument("--ema-decay", type=float, default=0.999, help="as the 'mse' fine-tune")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --run-dir")
    p.add_argument("--eval-only", action="store_true", help="measure the installed variants only")
    p.add_argument("--eval-images", type=int, default=10_000, help="test images for the round trip (max 10000)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def train_and_install(args: argparse.Namespace) -> dict:
    from flowturbo import fileio
    from flowturbo.training.autoencoder import Decoder
    from flowturbo.training.bundle import load_bundle
    from flowturbo.training.checkpoints import atomic_save_safetensors
    from flowturbo.training.trainers.common import DatasetBatches, LoopConfig, run_training, setup_distributed
    from flowturbo.training.trainers.data import ImageDataConfig, load_images
    from safetensors.torch import load_file

    bundle_dir = Path(args.bundle)
    bundle = load_bundle(bundle_dir)
    decoder_module, encoder = bundle.decoder, bundle.encoder
    if encoder is None or not hasattr(decoder_module, "variants"):
        raise SystemExit(f"{bundle_dir} needs our autoencoder's decoder variants and an encoder")
    ae_config = decoder_module.config
    config = DecoderFinetuneConfig(
        bundle=str(bundle_dir),
        loop=LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
                        grad_clip=0.0, device="cpu", ckpt_every=250, log_every=10, progress=not args.no_progress),
    )
    decoder = Decoder(ae_config)
    decoder.load_state_dict(decoder_module.variants[config.start_from].state_dict())
    model = FrozenEncoderDecoder(encoder, decoder, ae_config.latent_scale)

    def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images = batch[0]  # (n, 1, 32, 32) in [-1, 1]
        return F.l1_loss(net(images).float(), images)

    ctx = setup_distributed("cpu")
    source = load_images(ImageDataConfig(), seed=0)
    started = time.monotonic()
    result = run_training(out_dir=args.run_dir, config=config, loop=config.loop, model=model, step_fn=step,
                          batches=DatasetBatches(source.dataset, config.loop.batch_size, ctx, 1), ctx=ctx,
                          resume=args.resume, title=f"decoder '{config.variant}' (L1, frozen encoder)")
    ctx.close()
    if not result.finished:
        raise SystemExit(f"training stopped before finishing; rerun with --resume (run folder {args.run_dir})")
    trained = result.ema.decoder.state_dict()  # type: ignore[union-attr]
    path = bundle_dir / DECODER_FILE
    tensors = load_file(path)
    prefix = f"{config.variant}."  # decoder.safetensors holds "<variant>.<Decoder key>"
    replaced = [k for k in tensors if k.startswith(prefix)]
    if sorted(k[len(prefix):] for k in replaced) != sorted(trained):
        raise SystemExit(f"{path}: the '{config.variant}' variant's keys differ from the trained decoder's")
    tensors.update({prefix + k: v.detach().contiguous() for k, v in trained.items()})
    atomic_save_safetensors(tensors, path, None)
    summary = {"config": dataclasses.asdict(config) | {"loop": dataclasses.asdict(config.loop)},
               "steps": result.step,
               "wall_s": round(time.monotonic() - started, 1), "command": command_line()}
    fileio.atomic_write_json(bundle_dir / "training" / "decoder_ema.config.json", summary)
    fileio.atomic_write_bytes(bundle_dir / "training" / "decoder_ema.loss_curve.png",
                              (Path(args.run_dir) / "loss_curve.png").read_bytes())
    print(f"installed the new '{config.variant}' decoder into {path}")
    return summary


def measure(args: argparse.Namespace) -> dict:
    """Round trip decode(encode(x)) of the test split through each variant: PSNR and domain FID / accuracy."""
    from flowturbo.runtime.pytorch_backend import load_pipeline
    from flowturbo.training import fashion_mnist as fm
    from flowturbo.training.evaluation import DomainFeatures, fashion_mnist_reference, load_classifier
    from flowturbo.training.trainers.encoder import evaluate_round_trip

    bundle_dir = Path(args.bundle)
    features = DomainFeatures(load_classifier(bundle_dir / "classifier"))
    reference = fashion_mnist_reference(features, progress=False)
    arrays = fm.load_fashion_mnist("test", limit=args.eval_images)
    images = fm.to_model_range(arrays.images)
    labels = torch.as_tensor(arrays.labels, dtype=torch.int64)
    out = {}
    for variant in ("ema", "mse"):
        pipe = load_pipeline(str(bundle_dir), decoder_variant=variant, device="cpu")
        out[variant] = evaluate_round_trip(pipe.require_encoder("the round trip"), pipe.decoder, images, labels,
                                           features=features, reference=reference)
    return out


def command_line() -> str:
    return " ".join([".venv/bin/python", "scripts/train_default_decoder.py", *map(shlex.quote, sys.argv[1:])])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    if not args.eval_only:
        train_and_install(args)
    print(json.dumps(measure(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
