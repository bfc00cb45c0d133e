"""Does a refiner trained on a text-to-image teacher's own trajectories help? (issue 21 item 4, on CPU)

A tiny random ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (``tests/tiny_diffusers.py``: the real weights cannot
be downloaded here) is the teacher. For each pipeline:

1. ``flowturbo train refiner --teacher DIR --prompts TRAIN --preset tiny`` (the CLI itself, as a user runs it);
   the loss curve's first and last windows are reported;
2. on held-out prompts x seeds (the same noise for every method): the teacher's fine-grid solution (``--reference``,
   H64 on the model's shifted grid) and, for every FlowTurbo schedule, the RMS distance of its final latents to
   it **with the trained refiner** and **without it** (the same schedule with the refiner's offset 0: R steps
   reuse the carried velocity) — plus Heun / Euler baselines at similar call counts.

    python bench/text_refiner_study.py --out bench/results/text_refiner_study.json

Writes the JSON and prints a markdown table. No timing claims: the tiny models' latency says nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_common import git_commit  # noqa: E402
from flowturbo.fileio import atomic_write_text  # noqa: E402

TRAIN_PROMPTS = [
    "a photo of a cat", "the red fox in the snow", "a blue car on a bridge", "green hills at dawn",
    "a bowl of fruit", "an old lighthouse", "a city street at night", "a small wooden boat",
    "two dogs playing", "a mountain lake", "a castle on a hill", "a plate of pasta",
    "a yellow flower", "a rainy window", "a desert road", "a snowy forest",
]
HELD_OUT_PROMPTS = ["a white horse", "the blue sea", "a cup of coffee", "a field of tulips"]
METHODS = ["H1P1R2", "H1R3", "H2R2", "H1P2R1"]
BASELINES = ["H2", "H3", "E4", "E6"]


def train(name: str, folder: Path, prompts: Path, out: Path, steps: int, size: str | None) -> dict[str, Any]:
    """Train with the CLI; the loss curve's first / last 10% means from the final checkpoint."""
    cmd = [sys.executable, "-m", "flowturbo", "train", "refiner", "--teacher", str(folder), "--prompts", str(prompts),
           "--preset", "tiny", "--steps", str(steps), "--out", str(out), "--no-progress"]
    if size:
        cmd += ["--size", size]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: training failed:\n{done.stdout}\n{done.stderr}")
    from flowturbo.training.trainers.common import latest_checkpoint, load_checkpoint_state

    state = load_checkpoint_state(latest_checkpoint(out))
    losses = [float(v) for v in state["losses"]]
    window = max(1, len(losses) // 10)
    return {"command": " ".join(cmd[1:]), "seconds": round(time.time() - start, 1), "steps": len(losses),
            "loss_first": statistics.fmean(losses[:window]), "loss_last": statistics.fmean(losses[-window:]),
            "flops": state["extra"].get("flops"), "log": done.stdout.strip().splitlines()}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def evaluate(name: str, folder: Path, run: Path, seeds: list[int], reference: str, size: str | None) -> dict[str, Any]:
    from flowturbo.families import ImageSize
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.training.token_refiner import TokenRefiner, TrainedTokenRefiner, read_token_refiner

    sampler = Sampler.from_pipeline(str(folder), device="cpu", dtype="float32", refiner=str(run))
    family = sampler.pipeline.family
    trained = read_token_refiner(run)
    zero = TrainedTokenRefiner(TokenRefiner(trained.config).state_dict(), trained.config, trained.record, trained.dt)
    image_size = ImageSize.parse(size) if size else None
    cfg = trained.record.cfg

    from flowturbo.integrator import integrate
    from flowturbo.kernels.solver import SolverOps
    from flowturbo.noise import make_noise

    latent_shape = family.latent_shape(image_size)

    def final(spec: str, seed: int) -> torch.Tensor:
        """The final latents (B, C, h, w) of ``spec`` on the held-out prompts from the noise of ``seed``: the
        sampler's own loop (the one integrator, the family's calls), without the decode."""
        schedule = sampler.default_schedule(spec, cfg=cfg, size=image_size)
        family.check_schedule(schedule)
        cond = family.condition(HELD_OUT_PROMPTS, schedule, guidance=trained.record.guidance)
        noise = make_noise(len(HELD_OUT_PROMPTS), latent_shape, seed)
        with torch.no_grad():
            return integrate(schedule, noise, family.model_calls(cond, schedule), SolverOps(scale=cfg)).x.float()

    refs = {seed: final(reference, seed) for seed in seeds}
    rows: dict[str, Any] = {}
    for spec in BASELINES:
        rows[spec] = {"rms": statistics.fmean(rms(final(spec, s), refs[s]) for s in seeds)}
    for spec in METHODS:
        family.attach_refiner(trained)
        with_refiner = statistics.fmean(rms(final(spec, s), refs[s]) for s in seeds)
        family.attach_refiner(zero)
        without = statistics.fmean(rms(final(spec, s), refs[s]) for s in seeds)
        family.attach_refiner(trained)
        rows[spec] = {"rms": with_refiner, "rms_without_refiner": without}
    for spec, row in rows.items():
        schedule = sampler.default_schedule(spec, cfg=cfg, size=image_size)
        row["predictor_calls"], row["refiner_calls"] = schedule.predictor_calls, schedule.refiner_calls
    return {"reference": reference, "cfg": cfg, "guidance": trained.record.guidance, "size": trained.record.size,
            "prompts": HELD_OUT_PROMPTS, "seeds": seeds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/text_refiner_study", help="pipelines, prompts and runs go here")
    parser.add_argument("--pipelines", nargs="+", default=["sd3", "flux_dev"], help="tiny pipelines to study")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--reference", default="H64")
    parser.add_argument("--flux-size", default="32", help="FLUX image size (its default, 256, is slow on a CPU)")
    parser.add_argument("--out", default="bench/results/text_refiner_study.json")
    args = parser.parse_args()

    from tiny_diffusers import save_tiny_pipelines

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = {n: work / "pipelines" / n for n in args.pipelines}
    missing = tuple(n for n, f in folders.items() if not f.is_dir())
    if missing:
        save_tiny_pipelines(work / "pipelines", missing)
    prompts = work / "train_prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n", encoding="utf-8")
    record: dict[str, Any] = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
                              "device": f"{platform.processor() or platform.machine()} CPU, torch "
                                        f"{torch.__version__}, {torch.get_num_threads()} threads",
                              "command": " ".join(sys.argv), "train_prompts": TRAIN_PROMPTS, "pipelines": {}}
    for name, folder in folders.items():
        size = args.flux_size if name.startswith("flux") else None
        run = work / f"run_{name}"
        print(f"== {name}: training", flush=True)
        trained = train(name, folder, prompts, run, args.steps, size)
        print(f"   loss {trained['loss_first']:.4g} -> {trained['loss_last']:.4g} in {trained['seconds']} s", flush=True)
        print(f"== {name}: evaluating", flush=True)
        record["pipelines"][name] = {"training": trained,
                                     "evaluation": evaluate(name, folder, run, args.seeds, args.reference, size)}
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    lines = ["| pipeline | schedule | calls (pred + ref) | RMS to the reference, with refiner | without refiner |",
             "|---|---|---:|---:|---:|"]
    for name, result in record["pipelines"].items():
        for spec, row in result["evaluation"]["rows"].items():
            without = row.get("rms_without_refiner")
            lines.append(f"| {name} | {spec} | {row['predictor_calls']} + {row['refiner_calls']} | {row['rms']:.4f} | "
                         f"{'' if without is None else f'{without:.4f}'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
