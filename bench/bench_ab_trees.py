"""Interleaved A/B of two source trees (e.g. before/after a refactor) with bench_runner_ab.py in each.

Every round runs each tree's own ``bench/bench_runner_ab.py`` once (1 warm-up + 1 timed run per backend and
batch, in a fresh process with that tree's venv), alternating which tree goes first; rows are medians over
rounds, so drift of this shared machine hits both trees alike. Both trees time the same export directories.

    python bench/bench_ab_trees.py --tree before=/work/before --tree after=. --rounds 7 --batches 1 16 \\
        --threads 1 --run onnxruntime:/tmp/ab/onnx --run aoti:/tmp/ab/aoti --run cpp:/tmp/ab/aoti \\
        --out bench/results/ab_integrator.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                        help="a checkout with its own .venv (bash scripts/setup.sh), repeatable")
    parser.add_argument("--run", action="append", default=[], metavar="BACKEND:DIR")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trees = [(name, Path(folder).resolve()) for name, _, folder in (t.partition("=") for t in args.tree)]
    samples: dict[tuple[str, str, int], list[float]] = {}
    meta: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            order = trees if round_index % 2 == 0 else list(reversed(trees))
            for name, folder in order:
                out = Path(scratch) / f"{name}.json"
                command = [str(folder / ".venv" / "bin" / "python"), str(folder / "bench" / "bench_runner_ab.py"),
                           "--rounds", "1", "--warmup", "1", "--threads", str(args.threads),
                           "--batches", *map(str, args.batches), "--out", str(out)]
                for spec in args.run:
                    command += ["--run", spec]
                subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
                result = json.loads(out.read_text())
                meta[name] = {k: v for k, v in result.items() if k != "rows"}
                for row in result["rows"]:
                    samples.setdefault((name, row["backend"], row["batch"]), []).append(row["ms_per_image"])
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    rows = [{"tree": tree, "backend": backend, "batch": batch, "ms_per_image": statistics.median(values),
             "ms_per_image_all": values} for (tree, backend, batch), values in sorted(samples.items())]
    first, second = trees[0][0], trees[-1][0]
    # Paired by round: both trees ran back to back in each round, so the per-round ratio cancels slow drift of
    # the machine; its median and how many rounds the second tree was slower say more than two medians.
    print(f"| backend | batch | {first} ms/img | {second} ms/img | {second}/{first} | paired median ratio | "
          f"rounds {second} slower |\n|---|---:|---:|---:|---:|---:|---:|")
    lookup = {(r["tree"], r["backend"], r["batch"]): r["ms_per_image"] for r in rows}
    paired = []
    for backend, batch in sorted({(b, k) for _, b, k in samples}, key=lambda x: (x[1], x[0])):
        a, b = lookup.get((first, backend, batch)), lookup.get((second, backend, batch))
        if a and b:
            ratios = [y / x for x, y in zip(samples[(first, backend, batch)], samples[(second, backend, batch)])]
            slower = sum(r > 1 for r in ratios)
            paired.append({"backend": backend, "batch": batch, "paired_median_ratio": statistics.median(ratios),
                           "rounds_second_slower": slower, "ratios": ratios})
            print(f"| {backend} | {batch} | {a:.2f} | {b:.2f} | {b / a:.3f} | {statistics.median(ratios):.3f} | "
                  f"{slower}/{len(ratios)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"trees": {n: str(f) for n, f in trees}, "meta": meta,
                                              "rounds": args.rounds, "rows": rows, "paired": paired},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
