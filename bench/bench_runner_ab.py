"""Interleaved A/B timing of sampling backends on the default model (this shared CPU drifts between rows).

bench_export.py times each backend in turn, so a slow minute of the machine lands on one row. Here every
round runs every backend once, in order, and each row is the median over rounds: a drift hits all rows.
Export directories come from ``flowturbo export`` (or bench_export.py's ``--workdir``).

    python bench/bench_runner_ab.py --batches 1 16 --rounds 7 --threads 1 \\
        --run onnxruntime:/tmp/bexp4/onnx-time-input --run aoti:/tmp/bexp4/aoti-time-input \\
        --run cpp:/tmp/bexp4/aoti-time-input --run onnxruntime:/tmp/bexp3/onnx-unrolled \\
        --run aoti:/tmp/bexp3/aoti-unrolled --run cpp:/tmp/bexp3/aoti-unrolled --out bench/results/ab.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_common import git_commit
from flowturbo.runtime.sampler import Sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], metavar="BACKEND:DIR",
                        help="an exported backend to time (onnxruntime | aoti | cpp | tensorrt), repeatable")
    parser.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager baseline")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    samplers = []
    for spec in args.run:
        backend, _, folder = spec.partition(":")
        sampler = Sampler.from_artifacts(folder, backend=backend, threads=args.threads)
        samplers.append((f"{backend} {sampler.variant}", sampler, folder))
    schedule = samplers[0][1].schedule if samplers else None
    if not args.no_eager:
        eager = Sampler.from_bundle(device="cpu")
        schedule = schedule or eager.default_schedule()
        samplers.insert(0, ("pytorch-eager", eager, "embedded default"))
    for name, sampler, _ in samplers:
        if not hasattr(sampler, "pipeline") and sampler.schedule.id != schedule.id:
            raise SystemExit(f"{name} was exported for {sampler.schedule}, not {schedule}")

    def run_once(sampler, classes):
        kwargs = {"schedule": schedule, "progress": False} if hasattr(sampler, "pipeline") else {}
        start = time.perf_counter()
        sampler.sample(classes, seed=0, **kwargs)
        return time.perf_counter() - start

    rows = []
    for batch in args.batches:
        classes = [i % 10 for i in range(batch)]
        times = {name: [] for name, _, _ in samplers}
        for _ in range(args.warmup):
            for name, sampler, _ in samplers:
                run_once(sampler, classes)
        for _ in range(args.rounds):
            for name, sampler, _ in samplers:
                times[name].append(run_once(sampler, classes))
        for name, sampler, folder in samplers:
            rows.append({"backend": name, "source": folder, "batch": batch,
                         "ms_per_image": 1000 * statistics.median(times[name]) / batch,
                         "ms_per_image_all": [1000 * t / batch for t in times[name]]})
    common = {"device": f"cpu ({platform.machine()}, {args.threads} threads)", "commit": git_commit(),
              "schedule": schedule.notation, "schedule_id": schedule.id, "rounds": args.rounds,
              "torch": torch.__version__}
    base = {r["batch"]: r["ms_per_image"] for r in rows if r["backend"] == "pytorch-eager"}
    print(f"\n{json.dumps(common)}\n| backend | batch | ms/image (median of {args.rounds}) | vs eager |\n|---|---|---:|---:|")
    for r in rows:
        ratio = f"{base[r['batch']] / r['ms_per_image']:.2f}x" if r["batch"] in base else "-"
        print(f"| {r['backend']} | {r['batch']} | {r['ms_per_image']:.2f} | {ratio} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**common, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
