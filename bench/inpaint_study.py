"""Inpainting and editing quality on the embedded default (issue 11): QUALITY.md numbers and README figures.

    python bench/inpaint_study.py --num-images 1000 --out bench/results/inpaint_study.json --figures docs

Inpainting: the first N Fashion-MNIST test images, each inpainted towards its own class, with a centre mask
(the middle 16x16 of 32x32) and a half mask (the right half), for ``--methods`` (default: the default's
schedule H1R3, the paper's H1P5R3, Heun H4 and H8; CFG 1.5,
the same noise for every method): domain FID against the test split, class accuracy (the domain classifier
on the results), MSE of the kept region against the input (must be 0), and ms per image (sample + decode,
this CPU, one batch of ``--batch``). Editing: the first method at strengths 0.2 ... 1.0 towards the class ``(label + 1)
mod 10`` (e.g. a trouser towards a pullover): target-class accuracy against the mean absolute pixel distance to
the source. The unmodified test images' FID against the split is the floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench_common import git_commit
from flowturbo.runtime.images import make_grid, to_uint8
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.evaluation import DomainFeatures, evaluate_samples, load_classifier
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range

METHODS = ("H1R3", "H1P5R3", "H4", "H8")  # the first one also edits and fills the figures
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
CFG = 1.5


def masks(size: int = 32) -> dict[str, torch.Tensor]:
    centre = torch.zeros(1, 1, size, size)
    centre[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    half = torch.zeros(1, 1, size, size)
    half[..., size // 2:] = 1
    return {"centre": centre, "half": half}


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/inpaint_study.json"))
    parser.add_argument("--figures", type=Path, default=None, help="write inpaint_grid.png and edit_strip.png here")
    parser.add_argument("--methods", type=lambda text: tuple(text.split(",")), default=METHODS,
                        help="schedules, comma-separated (the first one also edits and fills the figures)")
    parser.add_argument("--latency-rounds", type=int, default=0,
                        help="instead of the study: ms/image of sample vs inpaint (centre) vs edit (0.6) per method, "
                             "interleaved over this many rounds (medians), on --batch images; JSON to --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.latency_rounds:
        latency(args)
        return
    data = load_fashion_mnist("test", limit=args.num_images)
    images = to_model_range(data.images)  # (N, 1, 32, 32) in [-1, 1]
    labels = [int(c) for c in data.labels]
    sampler = Sampler.from_bundle(device="cpu")
    classifier = load_classifier(DEFAULT_BUNDLE_DIR / "classifier")
    features = DomainFeatures(classifier, device="cpu")

    def score(results: torch.Tensor, conditioned_on: list[int]) -> dict[str, Any]:
        metrics = evaluate_samples(results, conditioned_on, features=features, classifier=classifier, progress=False)
        return {k: metrics[k] for k in ("fid", "precision", "recall", "class_accuracy")}

    rows: list[dict[str, Any]] = [{"method": "input (test images)", "mask": "-", **score(images, labels)}]
    for mask_name, mask in masks().items():
        keep = mask[0, 0] == 0
        for spec in args.methods:
            schedule = sampler.default_schedule(spec, cfg=CFG)
            out, seconds = timed(lambda: sampler.inpaint(images, mask, labels, schedule=schedule, seed=args.seed,
                                                         batch_size=args.batch, progress=False))
            kept_mse = float(((out.images[:, :, keep] - images[:, :, keep]) ** 2).mean())
            rows.append({"method": spec, "mask": mask_name, **score(out.images, labels), "kept_mse": kept_mse,
                         "ms_per_image": 1000 * out.times.total_s / len(labels),
                         "wall_ms_per_image": 1000 * seconds / len(labels),
                         "predictor_calls": out.predictor_calls, "refiner_calls": out.refiner_calls})
            print(json.dumps(rows[-1]), flush=True)
    targets = [(c + 1) % 10 for c in labels]
    edits: list[dict[str, Any]] = []
    for strength in STRENGTHS:
        schedule = sampler.default_schedule(args.methods[0], cfg=CFG)
        out = sampler.edit(images, strength, targets, schedule=schedule, seed=args.seed, batch_size=args.batch,
                           progress=False)
        metrics = score(out.images, targets)
        distance = float((out.images - images).abs().mean())
        edits.append({"strength": strength, "target_class_accuracy": metrics["class_accuracy"],
                      "mean_abs_pixel_distance": distance, "fid": metrics["fid"],
                      "ms_per_image": 1000 * out.times.total_s / len(labels)})
        print(json.dumps(edits[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": f"cpu ({platform.machine()}, "
              f"{args.threads} threads)", "num_images": len(labels), "seed": args.seed, "cfg": CFG,
              "batch": args.batch, "edit_schedule": args.methods[0], "inpaint": rows, "edit": edits}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.figures is not None:
        write_figures(sampler, images, labels, args.figures, args.seed, args.methods[0])


def latency(args: argparse.Namespace) -> None:
    """Side-by-side latency: plain sampling, inpainting and editing per method, interleaved round by round."""
    import statistics

    data = load_fashion_mnist("test", limit=args.batch)
    images = to_model_range(data.images)
    labels = [int(c) for c in data.labels]
    sampler = Sampler.from_bundle(device="cpu")
    mask = masks()["centre"]
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.latency_rounds):
        for spec in args.methods:
            schedule = sampler.default_schedule(spec, cfg=CFG)
            jobs = {
                "sample": lambda: sampler.sample(labels, schedule=schedule, seed=args.seed, progress=False),
                "inpaint": lambda: sampler.inpaint(images, mask, labels, schedule=schedule, seed=args.seed,
                                                   progress=False),
                "edit 0.6": lambda: sampler.edit(images, 0.6, labels, schedule=schedule, seed=args.seed,
                                                 progress=False),
            }
            for what, job in jobs.items():
                out = job()
                runs.setdefault((spec, what), []).append(1000 * out.times.total_s / len(labels))
    rows = [{"method": spec, "task": what, "ms_per_image": statistics.median(v), "runs": v}
            for (spec, what), v in runs.items()]
    for row in rows:
        print(f"| {row['method']} | {row['task']} | {row['ms_per_image']:.2f} |")
    result = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "batch": args.batch,
              "device": f"cpu ({platform.machine()}, {args.threads} threads)", "rounds": args.latency_rounds,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def write_figures(sampler: Sampler, images: torch.Tensor, labels: list[int], folder: Path, seed: int,
                  method: str) -> None:
    """README pictures: rows input | mask | ``method`` | H8 (centre mask), and an edit strength strip of ``method``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    picks = [0, 1, 2, 3, 4, 6]
    mask = masks()["centre"]
    tiles = []
    for k in picks:
        one = images[k:k + 1]
        row = [one, (mask * 2 - 1)]
        for spec in (method, "H8"):
            schedule = sampler.default_schedule(spec, cfg=CFG)
            row.append(sampler.inpaint(one, mask, [labels[k]], schedule=schedule, seed=seed, progress=False).images)
        tiles.append(torch.cat(row))
    grid = make_grid(to_uint8(torch.cat(tiles)), columns=4)
    Image.fromarray(grid[..., 0]).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        folder / "inpaint_grid.png")
    source, target = images[1:2], 3  # a pullover (test image 1) edited towards "Dress"
    strip = [source] + [sampler.edit(source, s, [target], schedule=sampler.default_schedule(method, cfg=CFG),
                                     seed=seed, progress=False).images for s in STRENGTHS]
    grid = make_grid(to_uint8(torch.cat(strip)), columns=len(strip))
    Image.fromarray(grid[..., 0]).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        folder / "edit_strip.png")


if __name__ == "__main__":
    main()
