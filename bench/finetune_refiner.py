"""Does the default's refiner hold FlowTurbo back at long steps? Measure it, then fine-tune it for longer steps.

1. Diagnostic: on held-out Fashion-MNIST latents, the refiner objective at fixed step sizes dt: how much of the
   teacher's velocity change ``teacher(x', t+dt) - v_t`` the refiner predicts. ``explained = 1 - MSE(v_t + r,
   target) / MSE(v_t, target)`` (1: perfect, 0: no better than reusing v_t, < 0: worse than no refiner).
2. Fine-tune: the FlowTurbo objective (``training.trainers.refiner.refiner_loss``) with ``dt ~ U(0, --max-dt]``
   instead of 0.12, starting from the bundle's refiner, AdamW + EMA, for ``--minutes`` of CPU time; the
   diagnostic again; the bundle copied to ``--out`` with the fine-tuned (EMA) refiner (atomic writes).

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_refiner.py --minutes 25 --out outputs/bundle_ft
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from flowturbo.fileio import atomic_write_bytes, atomic_write_json
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
from flowturbo.training.bundle import load_bundle
from flowturbo.training.encoders import load_encoder
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range
from flowturbo.refiner_dt import DtDistribution
from flowturbo.training.models import refiner_takes_dt
from flowturbo.training.trainers.refiner import T_MAX

DTS = (0.05, 0.12, 0.2, 0.25, 1 / 3, 0.5)


@torch.no_grad()
def encode(encoder, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([encoder.encode(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def diagnostic(refiner, teacher, x1: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Fraction of the teacher's velocity change the refiner explains at each fixed dt (same draws for all)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(len(x1), generator=g) * (1 - 0.05)
    out = {}
    for dt in DTS:
        t_ = t.view(-1, 1, 1, 1)
        x_t = t_ * x1 + (1 - t_) * x0
        v_t = teacher.velocity(x_t, t, labels).float()
        step = torch.minimum(torch.full_like(t, dt), T_MAX - t)
        x_next = x_t + step.view(-1, 1, 1, 1) * v_t
        target = teacher.velocity(x_next, t + step, labels).float()
        age = (step,) if refiner_takes_dt(refiner) else ()  # a dt-conditioned refiner gets the age of v_t
        pred = v_t + refiner(x_next, t + step, labels, v_t, *age).float()
        base = (v_t - target).pow(2).mean()
        out[f"{dt:.3f}"] = float(1 - (pred - target).pow(2).mean() / base)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--max-dt", type=float, default=0.35)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--out", default="outputs/bundle_ft")
    parser.add_argument("--report", default="bench/results/refiner_finetune.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR, device="cpu")
    teacher, refiner = bundle.predictor.eval().requires_grad_(False), bundle.refiner
    encoder = load_encoder(DEFAULT_BUNDLE_DIR)
    train = load_fashion_mnist("train", limit=args.train_images)
    test = load_fashion_mnist("test", limit=1000)
    x_train = encode(encoder, to_model_range(train.images))
    y_train = torch.as_tensor(train.labels, dtype=torch.long)
    x_test, y_test = encode(encoder, to_model_range(test.images)), torch.as_tensor(test.labels, dtype=torch.long)
    before = diagnostic(refiner.eval(), teacher, x_test, y_test)
    print("explained before:", json.dumps(before))

    from flowturbo.training.trainers.refiner import refiner_loss

    model = refiner.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    null = teacher.config.num_classes
    steps, losses, started = 0, [], time.perf_counter()
    g = torch.Generator().manual_seed(1)
    while time.perf_counter() - started < 60 * args.minutes:
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
        labels = y_train[idx].clone()
        labels[torch.rand(args.batch, generator=g) < 0.1] = null  # label dropout 0.1, as in training
        loss = refiner_loss(model, teacher, x_train[idx], labels, DtDistribution(max_dt=args.max_dt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        losses.append(float(loss.detach()))
        steps += 1
        if steps % 50 == 0:
            print(f"step {steps} loss {sum(losses[-50:]) / 50:.5f} ({time.perf_counter() - started:.0f} s)", flush=True)
    train_s = time.perf_counter() - started
    after = diagnostic(ema, teacher, x_test, y_test)
    print("explained after:", json.dumps(after))

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(DEFAULT_BUNDLE_DIR, out)
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
    atomic_write_bytes(out / "refiner.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(args.report, {
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_refiner.py --minutes {args.minutes} "
                   f"--max-dt {args.max_dt} --out {args.out}",
        "steps": steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "max_dt": args.max_dt,
        "train_seconds": train_s, "seconds_per_step": train_s / max(steps, 1), "train_images": args.train_images,
        "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])), "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "explained_before": before, "explained_after": after, "device": "cpu, 1 thread (2-core x86_64, shared)",
    })
    print(f"{steps} steps in {train_s:.0f} s; wrote {out} and {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
