"""Decode cost of the SD-VAE decoder vs a diffusers AutoencoderTiny (TAESD) decoder, same latents.

Random weights (cost does not depend on the values): the real TAESD / sd-vae-ft-* weights cannot be downloaded
on our machines, so this measures speed only, never quality.

    python bench/bench_decoders.py --device cpu --batch 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from bench_common import git_commit
from flowturbo.training.decoders import DiffusersTinyDecoder, DiffusersVAEDecoder

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    decoders = {
        "sd-vae (AutoencoderKL)": DiffusersVAEDecoder._from_vae(AutoencoderKL(**SD_VAE), 0.18215),
        "taesd (AutoencoderTiny)": DiffusersTinyDecoder(dict(AutoencoderTiny().config), AutoencoderTiny().decoder),
    }
    latents = torch.randn(args.batch, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    rows = []
    for name, decoder in decoders.items():
        decoder = decoder.to(device, dtype).eval()
        params = sum(p.numel() for p in decoder.parameters())
        with torch.inference_mode():
            decoder.decode(latents)  # warm-up
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                images = decoder.decode(latents)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        rows.append({"decoder": name, "parameters": params, "image_shape": list(images.shape[1:]),
                     "ms_per_image": 1000 * statistics.median(times) / args.batch})
    common = {"device": str(device) if device.type != "cpu" else f"cpu ({platform.machine()})", "dtype": args.dtype,
              "batch": args.batch, "commit": git_commit(), "torch": torch.__version__}
    print(json.dumps({**common, "rows": rows}, indent=2))
    base = rows[0]["ms_per_image"]
    for row in rows:
        print(f"| {row['decoder']} | {row['parameters'] / 1e6:.2f}M | {row['ms_per_image']:.1f} | "
              f"{base / row['ms_per_image']:.1f}x |")


if __name__ == "__main__":
    main()
