"""The quality study on the embedded default: FlowTurbo vs Euler / Heun / adaptive solvers.

Phases (run all with ``all``, or one at a time where the work is best done — e.g. ``generate`` on a GPU,
``latency`` on the CPU whose latency we report):

* ``generate``: for every method, N samples with identical seeds (noise from ``--seed``, classes cycled),
  stored as uint8 in ``DIR/samples.npz`` plus call counts in ``DIR/generate.json``.
* ``latency``: ms per image at a fixed batch on this machine, every method in one run (median of repeats).
* ``metrics``: domain FID / precision / recall / class accuracy for every method, Inception FID for a subset.
* ``report``: ``QUALITY.md`` tables and the Pareto plot (FID vs latency) from the JSON files.

    python bench/quality_study.py all --out outputs/quality          # everything on this machine
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench_common import git_commit
from flowturbo.runtime.images import to_uint8
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR, TorchPipeline, load_pipeline
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.sampling import make_noise, sample_adaptive, sample_schedule, sample_velocity_norm_rule

REPO = Path(__file__).resolve().parents[1]
STUDY_CFG = 1.5  # the guidance scale of every method in the study (the bundle default)


@dataclasses.dataclass(frozen=True)
class Method:
    """One sampler configuration of the study."""

    name: str
    family: str  # euler | heun | flowturbo | adaptive | velocity-norm
    spec: str | None = None  # schedule notation for fixed schedules
    options: tuple[tuple[str, Any], ...] = ()  # adaptive: method/atol/rtol; velocity-norm: c/dt_min/dt_max
    decoder: str | None = None  # decoder variant (None: the bundle's default)


METHODS: tuple[Method, ...] = (
    *(Method(f"E{n}", "euler", f"E{n}") for n in (6, 10)),
    *(Method(f"H{n}", "heun", f"H{n}") for n in (4, 6, 8)),
    *(Method(s, "flowturbo", s) for s in ("H1P2R1", "H1P3R2", "H1P5R3", "H2P4R2", "H2P6R3", "H3P6R3")),
    Method("dopri5-1e-2", "adaptive", options=(("method", "dopri5"), ("atol", 1e-2), ("rtol", 1e-2))),
    Method("heun-euler-1e-2", "adaptive", options=(("method", "adaptive_heun"), ("atol", 1e-2), ("rtol", 1e-2))),
    *(Method(f"vnorm-C{c}", "velocity-norm", options=(("c", c), ("dt_min", 0.02), ("dt_max", 0.25)))
      for c in (0.2, 0.4)),
    # The decoder comparison: the same latents as H2P4R2 / H8, decoded by the other variant.
    Method("H2P4R2-ema", "flowturbo", "H2P4R2", decoder="ema"),
    Method("H8-ema", "heun", "H8", decoder="ema"),
)
INCEPTION_METHODS = ("H8", "H2P4R2", "H1P5R3")


def _run_method(method: Method, pipe: TorchPipeline, noise: torch.Tensor, labels: torch.Tensor,
                decoders: dict[str | None, Any], cache: dict | None = None) -> tuple[torch.Tensor, int, int]:
    """Latents -> decoded images (b, C, H, W) for one batch, plus the predictor / refiner calls made.

    With ``cache`` (generate phase), methods that differ only in the decoder reuse the same latents.
    """
    key = (method.family, method.spec, method.options, int(noise.shape[0]), float(noise.flatten()[0]))
    if cache is not None and key in cache:
        latents, p, r = cache[key]
        return decoders[method.decoder].decode(latents), p, r
    kwargs = dict(num_classes=pipe.num_classes)
    if method.spec is not None:
        schedule = SamplingSchedule.parse(method.spec, guidance_scale=STUDY_CFG)
        result = sample_schedule(schedule, noise, labels, pipe.predictor, pipe.refiner, **kwargs)
    elif method.family == "adaptive":
        result = sample_adaptive(noise, labels, pipe.predictor, guidance_scale=STUDY_CFG, **dict(method.options),
                                 **kwargs)
    else:
        result = sample_velocity_norm_rule(noise, labels, pipe.predictor, guidance_scale=STUDY_CFG,
                                           **dict(method.options), **kwargs)
    if cache is not None:
        cache[key] = (result.latents, result.predictor_calls, result.refiner_calls)
    return decoders[method.decoder].decode(result.latents), result.predictor_calls, result.refiner_calls


def _decoders(model: str | None, pipe: TorchPipeline, device: str) -> dict[str | None, Any]:
    decoders: dict[str | None, Any] = {None: pipe.decoder}
    for variant in {m.decoder for m in METHODS if m.decoder}:
        decoders[variant] = load_pipeline(model, decoder_variant=variant, device=device).decoder
    return decoders


@torch.inference_mode()
def generate(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device)
    decoders = _decoders(args.model, pipe, args.device)
    n = args.num_samples
    labels_all = torch.arange(n) % pipe.num_classes
    noise_all = make_noise(n, pipe.latent_shape, args.seed, device=pipe.device)  # (N, C, H, W), same for all
    arrays: dict[str, np.ndarray] = {"labels": labels_all.numpy()}
    info: dict[str, Any] = {"num_samples": n, "seed": args.seed, "cfg": STUDY_CFG, "device": _device_name(pipe),
                            "methods": {}}
    cache: dict = {}
    for method in tqdm(METHODS, desc="methods"):
        chunks, calls = [], (0, 0)
        for start in range(0, n, args.batch):
            stop = min(start + args.batch, n)
            images, p, r = _run_method(method, pipe, noise_all[start:stop],
                                       labels_all[start:stop].to(pipe.device), decoders, cache)
            chunks.append(to_uint8(images))
            calls = (max(calls[0], p), max(calls[1], r))
        arrays[method.name] = np.concatenate(chunks)
        info["methods"][method.name] = {"predictor_calls": calls[0], "refiner_calls": calls[1],
                                        "family": method.family,
                                        "decoder": method.decoder or pipe.decoder.bundle_config()["variant"]}
    np.savez_compressed(out / "samples.npz", **arrays)
    (out / "generate.json").write_text(json.dumps(info, indent=2))


def _device_name(pipe: TorchPipeline) -> str:
    if pipe.device.type == "cuda":
        return torch.cuda.get_device_name(pipe.device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@torch.inference_mode()
def latency(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device)
    decoders = _decoders(args.model, pipe, args.device)
    b = args.latency_batch
    labels = (torch.arange(b) % pipe.num_classes).to(pipe.device)
    noise = make_noise(b, pipe.latent_shape, args.seed, device=pipe.device)
    rows: dict[str, Any] = {}
    for method in tqdm(METHODS, desc="latency"):
        _run_method(method, pipe, noise, labels, decoders)  # warm-up
        times = []
        for _ in range(args.repeats):
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _run_method(method, pipe, noise, labels, decoders)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows[method.name] = {"ms_per_image": 1000 * statistics.median(times) / b,
                             "ms_per_image_all": [1000 * t / b for t in times]}
    info = {"batch": b, "repeats": args.repeats, "device": _device_name(pipe), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": git_commit(), "methods": rows}
    (out / "latency.json").write_text(json.dumps(info, indent=2))


def metrics(args: argparse.Namespace) -> None:
    from flowturbo.training.evaluation import DomainFeatures, InceptionFeatures, evaluate_samples, load_classifier

    out = Path(args.out)
    data = np.load(out / "samples.npz")
    labels = torch.from_numpy(data["labels"])
    classifier = load_classifier(Path(args.model or DEFAULT_BUNDLE_DIR) / "classifier", device="cpu")
    domain = DomainFeatures(classifier, device="cpu")
    inception = InceptionFeatures("cpu") if args.inception_samples > 0 else None
    results: dict[str, Any] = {}
    for method in tqdm(METHODS, desc="metrics"):
        images = torch.from_numpy(data[method.name]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W)
        row = evaluate_samples(images, labels, features=domain, classifier=classifier, progress=False)
        if inception is not None and method.name in INCEPTION_METHODS:
            k = args.inception_samples
            incep = evaluate_samples(images[:k], labels[:k], features=inception,
                                     num_reference=args.inception_reference, progress=False)
            row["inception_fid"] = incep["fid"]
            row["inception_num_samples"] = k
        results[method.name] = row
    (out / "metrics.json").write_text(json.dumps(results, indent=2))


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    gen = json.loads((out / "generate.json").read_text())
    lat = json.loads((out / "latency.json").read_text())
    met = json.loads((out / "metrics.json").read_text())
    rows = []
    for method in METHODS:
        g, l, m = gen["methods"][method.name], lat["methods"][method.name], met[method.name]
        rows.append(dict(name=method.name, main=method.decoder is None, **g, **l, **m))
    _pareto_plot(rows, Path(args.plot))
    _write_between_markers(Path(args.report), _markdown(rows, gen, lat, args))
    if args.model_card:
        card_path = Path(args.model_card)
        card = json.loads(card_path.read_text())
        card["quality"] = {"source": "bench/quality_study.py (see QUALITY.md)", "num_samples": gen["num_samples"],
                           "cfg": gen["cfg"], "latency_device": lat["device"], "latency_batch": lat["batch"],
                           "rows": [{k: r.get(k) for k in ("name", "decoder", "predictor_calls", "refiner_calls",
                                                           "ms_per_image", "fid", "precision", "recall",
                                                           "class_accuracy", "inception_fid")} for r in rows]}
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(Path(args.report).read_text())


TABLE_START, TABLE_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def _write_between_markers(path: Path, table: str) -> None:
    """Replace the generated block of ``path`` (between the markers), keeping the hand-written analysis."""
    block = f"{TABLE_START}\n{table}\n{TABLE_END}"
    text = path.read_text() if path.exists() else f"# Quality study\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text or TABLE_END not in text:
        text = text.rstrip() + f"\n\n{TABLE_START}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(head + block + tail)
    os.replace(tmp, path)


def _pareto_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    markers = {"euler": "v", "heun": "o", "flowturbo": "*", "adaptive": "s", "velocity-norm": "D"}
    for family, marker in markers.items():
        pts = [r for r in rows if r["family"] == family and r["main"]]
        if pts:
            ax.scatter([r["ms_per_image"] for r in pts], [r["fid"] for r in pts], marker=marker, s=60, label=family)
            for r in pts:
                ax.annotate(r["name"], (r["ms_per_image"], r["fid"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency, ms per image (CPU, fixed batch)")
    ax.set_ylabel("FID (domain features)")
    ax.set_title("Embedded default: quality vs latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _markdown(rows: list[dict[str, Any]], gen: dict, lat: dict, args: argparse.Namespace) -> str:
    def fmt(v: Any, spec: str = ".3f") -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        "| method | decoder | predictor calls | refiner calls | ms/image | FID (domain) | precision | recall "
        "| class acc. | Inception FID |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['decoder']} | {r['predictor_calls']} | {r['refiner_calls']} | "
            f"{r['ms_per_image']:.1f} | {r['fid']:.2f} | {fmt(r['precision'])} | {fmt(r['recall'])} | "
            f"{fmt(r.get('class_accuracy'))} | {fmt(r.get('inception_fid'), '.2f')} |"
        )
    return "\n".join([
        "*Generated by `bench/quality_study.py report`; do not edit by hand.*",
        "",
        f"Samples: {gen['num_samples']} per method, identical noise (seed {gen['seed']}) and classes (cycled), "
        f"CFG {gen['cfg']}, generated on {gen['device']}. Latency: batch {lat['batch']}, median of "
        f"{lat['repeats']} runs on {lat['device']}, torch {lat['torch']}, {lat['date']}, commit {lat['commit']}.",
        "",
        *lines,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["generate", "latency", "metrics", "report", "all"])
    parser.add_argument("--model", default=None, help="bundle folder (default: the embedded default)")
    parser.add_argument("--out", default="outputs/quality", help="folder for samples.npz and the JSON files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500, help="batch of the generate phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inception-samples", type=int, default=500, help="0 disables Inception FID")
    parser.add_argument("--inception-reference", type=int, default=2000)
    parser.add_argument("--report", default=str(REPO / "QUALITY.md"), help="markdown file whose table block to write")
    parser.add_argument("--plot", default=str(REPO / "docs" / "quality_pareto.png"))
    parser.add_argument("--model-card", default=None, help="model_card.json whose 'quality' table to fill in")
    args = parser.parse_args(argv)
    phases = ["generate", "latency", "metrics", "report"] if args.phase == "all" else [args.phase]
    for phase in phases:
        {"generate": generate, "latency": latency, "metrics": metrics, "report": report}[phase](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
