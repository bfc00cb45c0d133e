"""FLOPs of the token refiner against its teacher at the real model sizes (issue 21 item 4: "a few % of the
teacher's FLOPs — report the ratio").

Both models are built on PyTorch's ``meta`` device from the published transformer configs (no weights needed) and
one call at 1024x1024 (128x128 latents, 4096 image tokens; SD3.5: 77 + 256 text tokens, FLUX.1: 256) is counted
with ``torch.utils.flop_counter`` (matmuls, attention, convolutions). The refiner is the default
``train refiner --teacher`` architecture: one block at the teacher's width and heads, dt-conditioned. One row, no
CFG doubling (CFG doubles the teacher's calls, not the refiner's: the ratio per guided step halves again).

    python bench/token_refiner_flops.py --out bench/results/token_refiner_flops.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from flowturbo.fileio import atomic_write_text
from flowturbo.training.token_refiner import TokenRefiner, TokenRefinerConfig, call_flops


def main() -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/token_refiner_flops.json")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    t = torch.zeros(1, device="meta")
    x = torch.zeros(1, 16, 128, 128, device="meta")  # (B, C, h, w) solver state of a 1024x1024 image
    with torch.device("meta"):
        # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
        sd3 = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
        pooled = torch.zeros(1, 2048)
        teacher = call_flops(lambda: sd3(hidden_states=x, encoder_hidden_states=torch.zeros(1, 333, 4096),
                                    pooled_projections=pooled, timestep=t))
        refiner = TokenRefiner(TokenRefinerConfig(latent_channels=16, patch_size=2, pooled_dim=2048, hidden_size=1536,
                                                  num_heads=24))
        mine = call_flops(lambda: refiner(x, t, x, pooled, t))
        results["SD3.5-medium"] = {"teacher_flops": teacher, "refiner_flops": mine, "ratio": mine / teacher,
                                   "refiner_parameters": sum(p.numel() for p in refiner.parameters())}
        # black-forest-labs/FLUX.1-schnell, transformer/config.json
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
        pooled = torch.zeros(1, 768)
        teacher = call_flops(lambda: flux(hidden_states=torch.zeros(1, 4096, 64), encoder_hidden_states=torch.zeros(1, 256, 4096),
                                     pooled_projections=pooled, timestep=t, img_ids=torch.zeros(4096, 3),
                                     txt_ids=torch.zeros(256, 3)))
        refiner = TokenRefiner(TokenRefinerConfig(latent_channels=16, patch_size=2, pooled_dim=768, hidden_size=3072,
                                                  num_heads=24))
        mine = call_flops(lambda: refiner(x, t, x, pooled, t))
        results["FLUX.1-schnell"] = {"teacher_flops": teacher, "refiner_flops": mine, "ratio": mine / teacher,
                                     "refiner_parameters": sum(p.numel() for p in refiner.parameters())}
    record = {"date": datetime.date.today().isoformat(), "size": "1024x1024", "torch": torch.__version__,
              "command": "python bench/token_refiner_flops.py", "results": results}
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    for name, row in results.items():
        print(f"{name}: teacher {row['teacher_flops'] / 1e12:.2f} TFLOP, refiner {row['refiner_flops'] / 1e12:.3f} "
              f"TFLOP per image and call: {row['ratio']:.1%} ({row['refiner_parameters'] / 1e6:.0f} M parameters)")


if __name__ == "__main__":
    main()
