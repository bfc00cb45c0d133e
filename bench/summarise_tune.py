"""Markdown table of bench/bench_tune.sh's results (bench/results/tune/*.json) for BENCHMARKS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "tune"


def main() -> int:
    print("| run | search | --num-samples | rungs | candidates | evaluations | images generated | wall s | "
          "recommended (FID) | front |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|---|")
    for name in ("halving-500-c10", "exhaustive-500-c10", "halving-500", "exhaustive-500", "halving-500-c40",
                 "exhaustive-500-c40", "halving-1000"):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        t = r["timings"]
        rec = next(c for c in r["candidates"] if c["name"] == r["recommended"])
        print(f"| {name} | {r['settings']['search']} | {r['settings']['num_samples']} | {r['rungs']} | "
              f"{r['num_candidates']} | {t['evaluations']} | {t['images_generated']} | {t['total_s']:.0f} | "
              f"{rec['name']} ({rec.get('score', rec.get('fid')):.3f}) | {', '.join(r['front'])} |")  # /1 files: fid
    rows = [json.loads((RESULTS / f"sample-{n}.json").read_text()) for n in (1, 2)
            if (RESULTS / f"sample-{n}.json").is_file()]
    if rows:
        print()
        print("| processes | images | wall s (incl. start-up) | images/s |")
        print("|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row['processes']} | {row['images']} | {row['wall_s']:.1f} | {row['images'] / row['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
