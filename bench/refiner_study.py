"""Does the refiner pay on our own default? (issue 20) — FlowTurbo schedules of several refiners vs Heun, Euler
and the ``dt = C/||f||`` rule, on two seed sets, with latency measured side by side.

For every seed set (``--seeds``): the same noise and classes for every method; an H32 solution of the ODE as the
reference for the latent distance; for every (bundle, method): domain FID / precision / recall / class accuracy of
``--num-samples`` images and the RMS distance of the final latents to the H32 ones. Then the latency of each
method at batches 16 and 1: interleaved rounds (every method once per round, in a rotated order), the median per
method and, for each method, the median of its per-round ratio to the baseline (``--baseline``, H4).

    python bench/refiner_study.py --bundle dt=outputs/bundle_dt --bundle nodt=outputs/bundle_nodt \\
        --bundle before=runtime/assets/default_model --seeds 0 100000 --out bench/results/refiner_study.json

The bundles must share the predictor and decoder (only the refiner differs): Heun / Euler / rule rows are run
once, with the first bundle. Writes the JSON and prints a markdown table (``--markdown`` also writes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench_common import git_commit
from flowturbo.fileio import atomic_write_text
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR, TorchPipeline, load_pipeline
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.sampling import make_noise, sample_schedule, sample_velocity_norm_rule

STUDY_CFG = 1.5  # the bundle default
REFERENCE_SPEC = "H32"
DEFAULT_CLASSIFIER = DEFAULT_BUNDLE_DIR / "classifier"
SOLVER_METHODS = ("E6", "E8", "H3", "H4", "H8", "vnorm-C0.4")
FLOWTURBO_METHODS = ("H1R3", "H1P1R2", "H1P2R1", "H2R2", "H1P1R3", "H1R4", "H1P5R3", "H2P4R2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", required=True, metavar="NAME=DIR",
                   help="a bundle to compare (repeatable; the first one also runs the refiner-free methods)")
    p.add_argument("--methods", default=",".join(FLOWTURBO_METHODS), help="FlowTurbo schedules (comma-separated)")
    p.add_argument("--solvers", default=",".join(SOLVER_METHODS), help="refiner-free methods (comma-separated)")
    p.add_argument("--baseline", default="H4", help="the latency baseline (a refiner-free method)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 100_000], help="seed sets (noise seed of image 0)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--batch", type=int, default=500, help="generation batch")
    p.add_argument("--latency-batches", type=int, nargs="+", default=[16, 1])
    p.add_argument("--latency-rounds", type=int, default=9)
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER),
                   help="domain classifier folder (default: the embedded default's)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--out", required=True, help="JSON file")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    return p.parse_args(argv)


def _run(method: str, pipe: TorchPipeline, noise: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Final latents (B, C, H, W) and the predictor / refiner calls of one method on one batch."""
    if method.startswith("vnorm-C"):
        result = sample_velocity_norm_rule(noise, labels, pipe.predictor, num_classes=pipe.num_classes,
                                           c=float(method.removeprefix("vnorm-C")), dt_min=0.02, dt_max=0.25,
                                           guidance_scale=STUDY_CFG)
    else:
        schedule = SamplingSchedule.parse(method, guidance_scale=STUDY_CFG)
        result = sample_schedule(schedule, noise, labels, pipe.predictor, pipe.refiner, num_classes=pipe.num_classes)
    return result.latents, result.predictor_calls, result.refiner_calls


@torch.inference_mode()
def quality(args: argparse.Namespace, bundles: dict[str, TorchPipeline], rows: dict[str, Any]) -> None:
    from flowturbo.training.evaluation import DomainFeatures, evaluate_samples, load_classifier

    first = next(iter(bundles.values()))
    classifier = load_classifier(Path(args.classifier), device="cpu")
    domain = DomainFeatures(classifier, device="cpu")
    n = args.num_samples
    labels_all = torch.arange(n) % first.num_classes
    jobs = [(name, m) for name in list(bundles)[:1] for m in args.solvers.split(",") if m] + \
           [(name, m) for name in bundles for m in args.methods.split(",") if m]
    for seed in args.seeds:
        noise_all = make_noise(n, first.latent_shape, seed)  # (N, C, H, W): image i from seed + i
        reference = torch.cat([_run(REFERENCE_SPEC, first, noise_all[s:s + args.batch],
                                    labels_all[s:s + args.batch])[0]
                               for s in tqdm(range(0, n, args.batch), desc=f"{REFERENCE_SPEC} seed {seed}")])
        for name, method in tqdm(jobs, desc=f"seed {seed}"):
            pipe = bundles[name]
            latents, calls = [], (0, 0)
            for s in range(0, n, args.batch):
                z, p, r = _run(method, pipe, noise_all[s:s + args.batch], labels_all[s:s + args.batch])
                latents.append(z)
                calls = (max(calls[0], p), max(calls[1], r))
            z = torch.cat(latents)
            images = torch.cat([pipe.decoder.decode(z[s:s + args.batch]) for s in range(0, n, args.batch)])
            metrics = evaluate_samples(images.float(), labels_all, features=domain, classifier=classifier,
                                       progress=False)
            key = f"{name}/{method}" if method in args.methods.split(",") else method
            row = rows.setdefault(key, {"bundle": name, "method": method, "predictor_calls": calls[0],
                                        "refiner_calls": calls[1], "by_seed": {}})
            row["by_seed"][str(seed)] = {
                **{k: metrics.get(k) for k in ("fid", "precision", "recall", "class_accuracy")},
                "latent_rms_to_h32": float(((z - reference) ** 2).mean().sqrt()),
            }


@torch.inference_mode()
def latency(args: argparse.Namespace, bundles: dict[str, TorchPipeline], rows: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds of whole requests (sample + decode, the Sampler's path) per batch size."""
    first_name = next(iter(bundles))
    methods = [m for m in args.solvers.split(",") if m and not m.startswith("vnorm")] + \
              [m for m in args.methods.split(",") if m]
    samplers = {name: Sampler(pipe) for name, pipe in bundles.items()}
    out: dict[str, Any] = {}
    for batch in args.latency_batches:
        classes = [k % 10 for k in range(batch)]
        times: dict[str, list[float]] = {m: [] for m in methods}
        for m in methods:  # warm-up
            samplers[first_name].sample(classes, schedule=SamplingSchedule.parse(m, guidance_scale=STUDY_CFG),
                                        seed=0, progress=False)
        for round_ in tqdm(range(args.latency_rounds), desc=f"latency batch {batch}"):
            order = methods[round_ % len(methods):] + methods[:round_ % len(methods)]
            for m in order:
                started = time.perf_counter()
                samplers[first_name].sample(classes, schedule=SamplingSchedule.parse(m, guidance_scale=STUDY_CFG),
                                            seed=round_, progress=False)
                times[m].append(1000 * (time.perf_counter() - started) / batch)
        base = times[args.baseline]
        out[str(batch)] = {m: {"ms_per_image": statistics.median(t), "runs": t,
                               "ratio_to_baseline": statistics.median(a / b for a, b in zip(t, base))}
                           for m, t in times.items()}
    return out


def markdown(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lat = result.get("latency", {})
    head = "| bundle | method | pred | ref | " + " | ".join(
        f"FID s{s} | prec. | recall | class acc. | rms to H32" for s in seeds) + " | " + " | ".join(
        f"ms/img b{b} | vs {result['baseline']}" for b in lat) + " |"
    lines = [head, "|" + "---|" * (4 + 5 * len(seeds) + 2 * len(lat))]
    for key, row in result["rows"].items():
        cells = [row["bundle"] if "/" in key else "–", row["method"], str(row["predictor_calls"]),
                 str(row["refiner_calls"])]
        for s in seeds:
            m = row["by_seed"].get(str(s), {})
            cells += [f"{m['fid']:.2f}" if m else "–", f"{m['precision']:.3f}" if m else "–",
                      f"{m['recall']:.3f}" if m else "–", f"{m['class_accuracy']:.3f}" if m else "–",
                      f"{m['latent_rms_to_h32']:.4f}" if m else "–"]
        for b, table in lat.items():
            entry = table.get(row["method"])
            cells += [f"{entry['ms_per_image']:.1f}", f"{entry['ratio_to_baseline']:.2f}"] if entry else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundles = {}
    for spec in args.bundle:
        name, _, folder = spec.partition("=")
        bundles[name] = load_pipeline(folder or None, device="cpu")
    rows: dict[str, Any] = {}
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
        "device": f"{platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "cfg": STUDY_CFG, "num_samples": args.num_samples, "seeds": args.seeds, "baseline": args.baseline,
        "bundles": {k: v.source for k, v in bundles.items()}, "reference": REFERENCE_SPEC, "rows": rows,
    }
    if not args.skip_quality:
        quality(args, bundles, rows)
    if not args.skip_latency:
        result["latency"] = latency(args, bundles, rows)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if args.markdown:
        atomic_write_text(Path(args.markdown), table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
