"""Refiner training speed on this CPU: steps/s of the ``train refiner`` step with and without the teacher cache.

The step is the trainer's own (``training.trainers.refiner``): a :class:`TeacherSampleBatches` source (the teacher's
two calls per fresh sample, or a pool reused ``--teacher-reuse`` times) and ``refiner_samples_loss`` + backward +
AdamW on the dt-conditioned refiner of the embedded default (SiT-N/2 teacher, one-block refiner), batch 256,
fp32, on Fashion-MNIST latents from the default bundle's encoder. Each configuration runs ``--warmup`` steps, then
``--steps`` timed steps; the configurations alternate over ``--rounds`` rounds (the CPU is shared: the median of
the rounds is reported, with every round). EMA and checkpointing are left out (a few % of a step).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_refiner_training.py --out bench/results/refiner_training.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flowturbo.fileio import atomic_write_json
from flowturbo.refiner_dt import DtDistribution
from flowturbo.training.checkpoints import extract_state_dict, load_checkpoint_file, load_sit_checkpoint
from flowturbo.training.encoders import load_encoder
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range
from flowturbo.training.models import RefinerConfig, VelocityRefiner
from flowturbo.training.trainers.common import DistContext, TensorBatches
from flowturbo.training.trainers.predictor import drop_labels
from flowturbo.training.trainers.refiner import (
    REFINER_TRAIN_PRESETS,
    TeacherCacheConfig,
    TeacherSampleBatches,
    refiner_samples_loss,
    teacher_samples,
)

BUNDLE = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "default_model"
# Steady-state speed does not depend on the pool's size (only its one-off fill does, estimated apart): small pools
# keep the benchmark short.
POOL = 8
CONFIGS = {"no cache": TeacherCacheConfig(), "reuse 2": TeacherCacheConfig(POOL, 2),
           "reuse 4": TeacherCacheConfig(POOL, 4), "reuse 8": TeacherCacheConfig(POOL, 8)}


@torch.no_grad()
def _latents(images: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = load_encoder(BUNDLE)
    data = load_fashion_mnist("train", limit=images)
    pixels = to_model_range(data.images)
    x1 = torch.cat([encoder.encode(pixels[i:i + 512]) for i in range(0, len(pixels), 512)])
    return x1, torch.as_tensor(data.labels, dtype=torch.long)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--out", default="bench/results/refiner_training.json")
    args = parser.parse_args()
    preset = REFINER_TRAIN_PRESETS["fashion-mnist-dt"]
    batch, dist = preset["loop"].batch_size, preset["dt"]
    teacher = load_sit_checkpoint(extract_state_dict(load_checkpoint_file(BUNDLE / "predictor.safetensors")))
    teacher = teacher.eval().requires_grad_(False)
    x1, labels = _latents(args.images)
    null = teacher.config.num_classes
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def make(data):
        latents, y = data
        return teacher_samples(teacher, latents, drop_labels(y, 0.1, null), dist)

    def run(cache: TeacherCacheConfig, steps: int) -> float:
        torch.manual_seed(0)
        refiner = VelocityRefiner(RefinerConfig.for_predictor(teacher.config, dt_conditioning=True)).train()
        optimizer = torch.optim.AdamW(refiner.parameters(), lr=preset["loop"].lr, foreach=True)
        source = TeacherSampleBatches(TensorBatches((x1, labels), batch, ctx, seed=0), make, cache, ctx.device)
        for _ in range(args.warmup):
            source.next_batch()  # the first call fills the pool: outside the timing (a one-off, estimated apart)
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            refiner_samples_loss(refiner, source.next_batch(), dt_input=True).backward()
            optimizer.step()
        return steps / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, cache in CONFIGS.items():
            rates[name].append(run(cache, args.steps))
            print(f"{name}: {rates[name][-1]:.3f} steps/s", flush=True)
    started = time.perf_counter()
    make((x1[:batch], labels[:batch]))
    fill_s = preset["cache"].batches * (time.perf_counter() - started)  # the preset's pool, filled once
    base = statistics.median(rates["no cache"])
    report = {
        "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_refiner_training.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "batch": batch, "dt": dist.to_dict(), "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads; shared machine)",
        "torch": torch.__version__,
        "steps_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "rounds": rates,
        "speedup_vs_no_cache": {name: statistics.median(r) / base for name, r in rates.items()},
        "pool_fill_seconds_estimate": fill_s,  # the preset's pool of preset["cache"].batches teacher batches
        "preset": {"steps": preset["loop"].steps, "reuse": preset["cache"].reuse, "pool_batches": preset["cache"].batches},
        "preset_minutes_estimate": (preset["loop"].steps / statistics.median(rates[f"reuse {preset['cache'].reuse}"])
                                    + fill_s) / 60,
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
