"""``flowturbo tune``: the command over :mod:`flowturbo.runtime.tune` (search, front, recommendation, export).

Writes into ``--out`` (a staged folder, swapped in when complete): ``tune.json`` (settings, call costs, every
candidate with its metric value per rung, the front, the recommendation, timings), ``front.json`` (the front and the
recommendation only), ``recommended_schedule.json`` (the recommended fixed schedule's JSON: ``flowturbo sample
--schedule FILE`` and ``flowturbo export --schedule FILE`` take it), ``table.txt`` and ``front.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from flowturbo.cliargs import (
    GUIDANCE_SCALE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Number,
    input_path,
    int_in,
    output_path,
)
from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import MAX_THREADS

BACKENDS = ("pytorch",)
METRICS = ("domain-fid", "inception-fid", "fine-grid")  # fine-grid: RMS distance to the model's own fine solution
TEXT_GRIDS = "model,uniform,power:1.5"  # --grids' default for a --pipeline model (its own grid first)
CLASS_GRIDS = "uniform,power:1.5,power:0.75,shift:2,shift:0.5"
# The table's name for the metric's value (each candidate's "score" in tune.json).
SCORE_LABELS = {"domain-fid": "FID", "inception-fid": "FID", "fine-grid": "fine RMS"}


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    from flowturbo.runtime.cli import _add_model_arguments
    from flowturbo.runtime.text_cli import add_text_arguments

    p = sub.add_parser("tune", help="search schedules (H/P/R/E counts, time grids, the velocity-norm rule) for a "
                                    "latency budget: Pareto front, recommendation, optional export")
    _add_model_arguments(p)
    add_text_arguments(p)  # --pipeline DIR --prompts FILE: tune a text-to-image model on a prompt set
    b = p.add_argument_group("budget (one of)")
    budget = b.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=POSITIVE,
                        help="ms per image (sample + decode) at --latency-batch; the recommendation's measured "
                             "latency is held to it too (a warning, and the best measured candidate that fits)")
    budget.add_argument("--budget-calls", type=POSITIVE,
                        help="predictor-call equivalents (a refiner call counts its measured cost ratio)")
    q = p.add_argument_group("quality")
    q.add_argument("--metric", choices=METRICS, default=None,
                   help="domain-fid: the bundle's classifier features (fast; the default for class models); "
                        "inception-fid: standard InceptionV3 (text models: against --reference); fine-grid: RMS "
                        "distance of the final latents to the model's own H{--fine-steps} solution from the same "
                        "noise and prompt (no reference needed; the default for --pipeline)")
    q.add_argument("--fine-steps", type=int_in(2, 512), default=None,
                   help="Heun steps of the fine-grid metric's reference solution, on the model's own grid "
                        "(default 64)")
    q.add_argument("--num-samples", type=POSITIVE_INT, default=1000, help="samples of the last rung (the front's FIDs)")
    q.add_argument("--allow-small-sample", action="store_true",
                   help="allow --num-samples below the metric's minimum (500; inception-fid: 2049, more than its "
                        "2048 feature dimensions; FIDs then carry a warning)")
    q.add_argument("--num-reference", type=Number(int, low=2), default=10000,
                   help="Fashion-MNIST test images for the reference")
    q.add_argument("--reference", default=None, type=input_path("--reference"),
                   help="reference .npz (mu, sigma) instead of Fashion-MNIST, or a folder of reference images "
                        "(fitted to the image size; what inception-fid on a --pipeline model compares with)")
    q.add_argument("--classifier", default=None, type=input_path("--classifier"),
                   help="classifier folder (default: the model's classifier/)")
    s = p.add_argument_group("search")
    s.add_argument("--search", choices=["halving", "exhaustive"], default="halving")
    s.add_argument("--eta", type=Number(int, low=2), default=3,
                   help="successive halving: keep 1/eta, give eta times more samples")
    s.add_argument("--min-samples", type=POSITIVE_INT, default=100, help="samples of the first rung (at least)")
    s.add_argument("--heun", default="0:3", help="Heun step counts, LO:HI or a list (default 0:3)")
    s.add_argument("--pseudo", default="0:6", help="pseudo-corrector step counts (default 0:6)")
    s.add_argument("--refiner-steps", default="0:3", help="refiner step counts (default 0:3)")
    s.add_argument("--euler", default="4,6,8,10", help="Euler step counts ('' for none)")
    s.add_argument("--grids", default=None,
                   help="time grids: uniform, power:G (t=u^G), shift:S (t=Su/(1+(S-1)u)), model (the model's own: "
                        "the shifted grid of a --pipeline model; uniform for class models); default "
                        f"{CLASS_GRIDS} (class models), {TEXT_GRIDS} (--pipeline)")
    s.add_argument("--vnorm-c", default=None,
                   help="C values of the rule dt = C/||f|| ('' for none; default 0.2,0.3,0.4,0.6 on class models, "
                        "none on --pipeline models, which cannot run it)")
    s.add_argument("--general-max-steps", type=int_in(0, 6), default=0,
                   help="also every valid E/H/P/R string of at most this many steps (any order)")
    s.add_argument("--max-steps", type=int_in(1, 64), default=12)
    s.add_argument("--baselines", default="", help="schedules always scored on every sample and shown, e.g. H4,H8")
    s.add_argument("--cfg", type=GUIDANCE_SCALE, default=None, help="guidance scale (default: the model's)")
    s.add_argument("--guidance-channels", type=POSITIVE_INT, default=None)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--batch", type=POSITIVE_INT, default=100, help="images per generation batch")
    s.add_argument("--latency-batch", type=POSITIVE_INT, default=16, help="images per batch for costs and latencies")
    s.add_argument("--latency-repeats", type=POSITIVE_INT, default=3)
    s.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help="CPU threads of torch (default: all cores; 1 is steadier on a busy 2-core machine); under "
                        "torchrun the costs and latencies are measured by rank 0 alone with this many threads "
                        "(default: what a single process uses, not torchrun's 1 per process)")
    s.add_argument("--backend", default="pytorch", choices=BACKENDS,
                   help="the backend candidates are priced and timed on; only pytorch: prices are eager per-call "
                        "costs (models, kernels and dtype as `flowturbo sample` loads them); the measured latency "
                        "of the front is eager on CPU and, on CUDA, the CUDA-graph path `flowturbo sample` runs by "
                        "default (eager with --no-cuda-graph). Exported backends (onnxruntime, aoti, tensorrt, "
                        "cpp) are not tuned here: time the exported schedule with `flowturbo profile`")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, type=output_path("--out"),
                   help="output folder (tune.json, front.json, table.txt, front.png, recommended_schedule.json); "
                        "staged and swapped in when complete; replaced only if it is a tune output")
    o.add_argument("--cache", default=None, type=output_path("--cache"),
                   help="cache folder for features per schedule id (default: $FLOWTURBO_CACHE_DIR or "
                        "~/.cache/flowturbo, under tune/)")
    o.add_argument("--resume", action="store_true", help="continue the interrupted tune of --out (same settings)")
    o.add_argument("--export", default=None, metavar="DIR", type=output_path("--export"),
                   help="also export the recommended fixed schedule here")
    o.add_argument("--export-format", default="onnx", help="formats for --export (default onnx)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing export directory at --export (only one holding nothing but flowturbo's "
                        "own files; an identical export is reused)")
    o.add_argument("--wait", action="store_true", help="wait for another flowturbo process writing --out")
    o.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_tune)


def _cache_root(args: argparse.Namespace) -> Path:
    if args.cache:
        return Path(args.cache)
    from flowturbo.training.evaluation import default_cache_dir

    return default_cache_dir() / "tune"


def state_path_for(cache_root: Path, out: str) -> Path:
    """Where the resume state of the tune writing ``out`` lives (keyed by the absolute --out path)."""
    key = hashlib.sha256(os.path.abspath(out).encode()).hexdigest()[:16]
    return cache_root / "runs" / f"{key}.json"


def resolve_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on the model's kind: a ``--pipeline`` model (or a text bundle, which names one) tunes
    with ``--metric fine-grid`` on its own grid first and without the velocity-norm rule; class models as before."""
    from flowturbo.runtime.text_cli import resolve_text_bundle
    from flowturbo.runtime.tune import DEFAULT_FINE_STEPS

    resolve_text_bundle(args)  # --model TEXT_BUNDLE -> its --pipeline folder + --refiner + defaults
    text = args.pipeline is not None
    args.metric = args.metric or ("fine-grid" if text else "domain-fid")
    args.grids = args.grids if args.grids is not None else (TEXT_GRIDS if text else CLASS_GRIDS)
    if args.vnorm_c is None:
        args.vnorm_c = "" if text else "0.2,0.3,0.4,0.6"
    if args.fine_steps is not None and args.metric != "fine-grid":
        raise FlowTurboError(f"--fine-steps sets the fine-grid metric's reference; --metric is {args.metric}")
    args.fine_steps = args.fine_steps or DEFAULT_FINE_STEPS


def check_text_tune_args(args: argparse.Namespace) -> None:
    """A ``--pipeline`` tune's flags (after :func:`resolve_defaults`): prompts, a metric that fits text-to-image
    images, nothing only class models have. The prompts are read into ``args.tune_prompts``."""
    from flowturbo.families import ImageSize
    from flowturbo.runtime.text_cli import check_prompt_flags, given_prompts, refuse_model_flags, refuse_text_flags

    args.tune_prompts = None
    if args.pipeline is None:
        refuse_text_flags(args)
        return
    refuse_model_flags(args)
    check_prompt_flags(args, "tune --pipeline needs the prompts to tune on: pass --prompts FILE (one per line) or "
                             "--prompt TEXT (repeatable); image i uses prompt i mod P")
    if args.metric == "domain-fid":
        raise FlowTurboError("--metric domain-fid uses a Fashion-MNIST classifier's features, which say nothing about "
                             "a text-to-image model's images: use --metric fine-grid (the default here), or "
                             "inception-fid with --reference FOLDER")
    if args.metric == "inception-fid" and args.reference is None:
        raise FlowTurboError("--metric inception-fid on a --pipeline model needs --reference: a folder of reference "
                             "images (or a statistics .npz); or use --metric fine-grid, which needs none")
    if args.vnorm_c.strip():
        raise FlowTurboError("--vnorm-c: the velocity-norm rule runs on class-conditional models only; drop it")
    if args.guidance_channels is not None:
        raise FlowTurboError("--guidance-channels is the SiT models' partial-channel CFG; text-to-image CFG guides "
                             "every latent channel")
    if args.export is not None:
        raise FlowTurboError("--export works with class-conditional bundles; export the recommendation with "
                             "`flowturbo export --pipeline DIR --schedule OUT/recommended_schedule.json` (and the "
                             "same --size)")
    if args.size is not None:
        ImageSize.parse(args.size)
    args.tune_prompts = tuple(given_prompts(args))


def check_tune_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything is loaded (one ``error:`` line each)."""
    from flowturbo.runtime.cli import check_device, check_seed
    from flowturbo.runtime.tune import check_metric_samples

    resolve_defaults(args)
    check_text_tune_args(args)
    check_seed(args.seed)
    check_device(args.device)
    budget = args.budget_ms if args.budget_ms is not None else args.budget_calls
    if not budget > 0:
        raise FlowTurboError(f"the budget must be > 0, got {budget}")
    check_metric_samples(args.num_samples, args.metric, allow_small_sample=args.allow_small_sample,
                         flag="--num-samples")
    if args.num_samples < 1 or args.min_samples < 1 or args.batch < 1 or args.latency_batch < 1:
        raise FlowTurboError("--num-samples, --min-samples, --batch and --latency-batch must be >= 1")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise FlowTurboError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.eta < 2:
        raise FlowTurboError(f"--eta must be >= 2, got {args.eta}")
    if args.metric == "domain-fid" and args.predictor is not None and args.classifier is None:
        raise FlowTurboError("--metric domain-fid needs a domain classifier: official checkpoints have none; pass "
                             "--classifier DIR or --metric inception-fid")
    if args.export is not None and args.predictor is not None:
        raise FlowTurboError("--export needs a bundle (--model or the embedded default); package the official "
                             "checkpoints into a bundle (flowturbo train package) and export that")
    _space(args)  # --heun, --grids, ... parse (a reversed range, an empty space) before anything loads
    check_outputs(args)


def _space(args: argparse.Namespace) -> Any:
    from flowturbo.runtime.tune import SearchSpace

    return SearchSpace.from_text(heun=args.heun, pseudo=args.pseudo, refiner=args.refiner_steps, euler=args.euler,
                                 grids=args.grids, vnorm_c=args.vnorm_c, general_max_steps=args.general_max_steps,
                                 max_steps=args.max_steps)


def check_outputs(args: argparse.Namespace) -> None:
    """Every pre-condition of tune's outputs, before anything loads: ``--out``, ``--export`` and the cache folder
    apart from one another (the default cache included; the flags against the inputs are checked by the command
    line for every command), ``--export`` writable, an export directory (not another kind of output) and, when it
    holds one already, ``--overwrite`` given; ``--export-format`` known."""
    from flowturbo.fileio import check_apart, check_replaceable, check_writable_target

    if args.cache is None:  # the default cache folder is an output too
        check_apart([("--out", args.out), ("--export", args.export),
                     ("the default --cache", str(_cache_root(args)))], [])
    if args.export is None:
        return
    check_writable_target(args.export, "--export")
    check_replaceable(args.export, "export directory", command="export", flag="--export")
    export = Path(args.export)
    if export.is_dir() and any(export.iterdir()) and not args.overwrite:
        raise FlowTurboError(f"--export {args.export} already holds an export directory; pass --overwrite to replace "
                             "it (an identical export is reused), or choose another --export")
    from flowturbo.export.pipeline import ExportRequest
    from flowturbo.schedule import SamplingSchedule

    ExportRequest(schedule=SamplingSchedule.parse("E1"), formats=_export_formats(args))  # formats known, tools here


def _export_formats(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(f.strip() for f in args.export_format.split(",") if f.strip())


def _config(args: argparse.Namespace, pipe: Any) -> Any:
    from flowturbo.dtypes import dtype_name
    from flowturbo.runtime.tune import TuneConfig

    space = _space(args)
    defaults = pipe.defaults
    return TuneConfig(
        model=pipe.source, metric=args.metric, num_samples=args.num_samples, min_samples=args.min_samples,
        eta=args.eta, search=args.search, batch=args.batch, latency_batch=args.latency_batch, seed=args.seed,
        cfg=defaults.cfg if args.cfg is None else args.cfg,
        guidance_channels=defaults.guidance_channels if args.guidance_channels is None else args.guidance_channels,
        budget_ms=args.budget_ms, budget_calls=args.budget_calls, space=space,
        baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        device=str(pipe.device), dtype=dtype_name(pipe.dtype), num_reference=args.num_reference,
        reference=args.reference, allow_small_sample=args.allow_small_sample, latency_repeats=args.latency_repeats,
        fine_steps=args.fine_steps,
    )


def run_tune(args: argparse.Namespace) -> int:
    import contextlib

    from flowturbo.fileio import OutputFolder
    from flowturbo.runtime.distributed import process_group

    check_tune_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    cache_root = _cache_root(args)
    folders: list[OutputFolder] = []
    with process_group(args.device) as ranks, contextlib.ExitStack() as output:

        def open_output() -> None:
            if ranks.is_main:  # both outputs checked and locked before the search (export_bundle re-enters the lock)
                folders.append(output.enter_context(OutputFolder(args.out, command="tune", what="tune output",
                                                                 wait=args.wait)))
                if args.export:
                    output.enter_context(OutputFolder(args.export, command="export", what="export directory",
                                                      wait=args.wait, flag="--export"))

        ranks.run_all(open_output, "checking --out")
        tuner = ranks.run_all(lambda: _make_tuner(args, ranks, cache_root), "loading the model")
        report = ranks.run_all(tuner.run, "the search")

        def write() -> None:
            if not ranks.is_main:
                return
            with folders[0].staging() as staging:
                write_outputs(staging, report, tuner)
            print_summary(report, args)
            state = state_path_for(cache_root, args.out)
            with contextlib.suppress(FileNotFoundError):
                state.unlink()  # the tune is complete: nothing to resume
            if args.export:
                _export(args, report)

        ranks.run_all(write, "writing the results")
    return 0


def _make_tuner(args: argparse.Namespace, ranks: Any, cache_root: Path) -> Any:
    from flowturbo.runtime.cli import _classifier_folder, _pipeline_options
    from flowturbo.runtime.pytorch_backend import load_pipeline
    from flowturbo.runtime.tune import Tuner, TuneRequests
    from flowturbo.training.evaluation import DomainFeatures, InceptionFeatures, load_classifier
    from flowturbo.training.evaluation.classifier import CONFIG_FILENAME as CLASSIFIER_CONFIG

    options = _pipeline_options(args)
    cuda_graph = options.pop("cuda_graph")  # the latency re-measurement's path on CUDA (the sampler's default)
    options["device"] = ranks.device(args.device)
    classifier = None
    if args.pipeline is not None:
        pipe, requests = _load_text_model(args, ranks, options["device"])
    else:
        pipe, requests = load_pipeline(args.model, **options), TuneRequests()
        folder = _classifier_folder(args)
        if (folder / CLASSIFIER_CONFIG).is_file():
            classifier = DomainFeatures(load_classifier(folder, device=pipe.device), device=pipe.device)
        elif args.metric == "domain-fid":
            raise FlowTurboError(f"no domain classifier at {folder}; pass --classifier DIR or --metric inception-fid")
    extractor = {"domain-fid": lambda: classifier, "fine-grid": lambda: None,
                 "inception-fid": lambda: InceptionFeatures(pipe.device)}[args.metric]()
    config = _config(args, pipe)
    return Tuner(config, pipe, extractor, classifier=classifier, cache_dir=cache_root, ranks=ranks,
                 progress=not args.no_progress, state_path=state_path_for(cache_root, args.out), resume=args.resume,
                 measure_threads=args.threads, cuda_graph=cuda_graph, requests=requests)


def _load_text_model(args: argparse.Namespace, ranks: Any, device: Any) -> tuple[Any, Any]:
    """The ``--pipeline`` model (with ``--refiner``) and the tune's requests; the request (size, CFG, negative
    prompt, guidance) is checked against the folder's configs before any weights load."""
    from flowturbo.families import ImageSize
    from flowturbo.runtime.pytorch_backend import load_text_pipeline
    from flowturbo.runtime.text_cli import request_check
    from flowturbo.runtime.tune import TuneRequests

    size = ImageSize.parse(args.size) if args.size is not None else None
    check = request_check(args, size, lambda parse: parse("H2"))  # candidates vary; the guidance does not
    pipe = load_text_pipeline(args.pipeline, device=device, dtype=args.dtype, kernel_backend=args.kernels,
                              max_sequence_length=args.max_sequence_length, before_weights=check,
                              refiner=args.refiner, defaults=args.text_defaults)
    return pipe, TuneRequests(args.tune_prompts, args.negative_prompt, args.guidance, size)


# ------------------------------------------------------------------------------------------------ outputs
def table_text(report: dict[str, Any]) -> str:
    """The candidates scored on the most samples (front marked), then the rest by the rung they reached."""
    rows = [r for r in report["candidates"] if r["score"] is not None]
    rows.sort(key=lambda r: (-(r["num_samples"] or 0), r["cost"] if r["cost"] is not None else 1e30, r["score"]))
    unit = report["budget"]["unit"]
    score = SCORE_LABELS.get(report["metric"], "FID")
    head = (f"{'':2}{'candidate':<24}{'family':<14}{'pred':>6}{'ref':>5}{'priced ms/img':>14}{'measured':>10}"
            f"{'samples':>9}{score:>9}{'class acc':>10}  flags")
    lines = [f"budget: {report['budget']['value']:g} {unit}; front marked *, recommended >, baselines b", head,
             "-" * len(head)]
    for r in rows:
        mark = ">" if r["name"] == report["recommended"] else ("*" if r["on_front"] else ("b" if r["baseline"] else ""))
        measured = "-" if r.get("measured_ms_per_image") is None else f"{r['measured_ms_per_image']:.2f}"
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
        pred = f"{r['predictor_calls']:.3g}" if r["predictor_calls"] is not None else "-"
        ref = f"{r['refiner_calls']:.3g}" if r["refiner_calls"] is not None else "-"
        price = "-" if r["price_ms_per_image"] is None else f"{r['price_ms_per_image']:.2f}"
        over = "" if r["within_budget"] in (None, True) else " (over budget)"
        if r.get("measured_within_budget") is False:
            over += " (measured over budget)"
        lines.append(f"{mark:<2}{r['name']:<24}{r['family']:<14}{pred:>6}{ref:>5}{price:>14}{measured:>10}"
                     f"{r['num_samples']:>9}{r['score']:>9.3f}{acc:>10}  {'; '.join(r['flags'])}{over}")
    return "\n".join(lines)


def write_outputs(folder: Path, report: dict[str, Any], tuner: Any) -> None:
    from flowturbo.fileio import json_text

    (folder / "tune.json").write_text(json_text(report))
    front = [r for r in report["candidates"] if r["on_front"] or r["name"] == report["recommended"]]
    (folder / "front.json").write_text(json_text({
        "budget": report["budget"], "recommended": report["recommended"],
        "recommended_fixed": report["recommended_fixed"], "metric": report["metric"],
        "latency_check": report.get("latency_check"),
        "num_samples": report["rungs"][-1], "front": front, "family_fronts": report["family_fronts"]}))
    fixed = next((r for r in report["candidates"] if r["name"] == report["recommended_fixed"]), None)
    if fixed is not None:
        (folder / "recommended_schedule.json").write_text(json_text(fixed["schedule"]))
    (folder / "table.txt").write_text(table_text(report) + "\n")
    plot_front(report, folder / "front.png")


def plot_front(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["candidates"] if r["num_samples"] == report["rungs"][-1]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    markers = {"flowturbo": "*", "heun": "o", "euler": "v", "general": "x", "velocity-norm": "D"}
    for family, marker in markers.items():
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        pts.sort(key=lambda r: r["price_ms_per_image"])
        ax.scatter([r["price_ms_per_image"] for r in pts], [r["score"] for r in pts], marker=marker, s=40,
                   label=family, alpha=0.8)
        front = [r for r in pts if r["name"] in report["family_fronts"].get(family, [])]
        ax.plot([r["price_ms_per_image"] for r in front], [r["score"] for r in front], lw=1, alpha=0.6)
        for r in front:
            ax.annotate(r["name"], (r["price_ms_per_image"], r["score"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    if report["budget"]["unit"] == "ms/image":
        ax.axvline(report["budget"]["value"], color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel(f"priced latency, ms per image (batch {report['costs']['batch']}, {report['costs']['device']})")
    ax.set_ylabel(f"{report['metric']} ({report['rungs'][-1]} samples)")
    ax.set_title("flowturbo tune: quality vs cost (lines: each family's front)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    costs = report["costs"]
    ref = "-" if costs["refiner_ms"] is None else f"{costs['refiner_ms']:.2f}"
    print(f"flowturbo tune: {report['num_candidates']} candidates, rungs {report['rungs']}, metric {report['metric']}, "
          f"{report['world_size']} process(es)")
    print(f"call costs at batch {costs['batch']} on {costs['device']}: predictor {costs['predictor_ms']:.2f} ms, "
          f"refiner {ref} ms, decode {costs['decode_ms']:.2f} ms, step update {costs['step_ms']:.2f} ms")
    print(table_text(report))
    paths = sorted({r["measured_path"] for r in report["candidates"] if r.get("measured_path")})
    print(f"priced from per-call costs ({costs.get('path', 'eager')}, pytorch); measured latency: "
          f"{', '.join(paths) or '-'}")
    rec = next(r for r in report["candidates"] if r["name"] == report["recommended"])
    measured = rec.get("measured_ms_per_image")
    print(f"recommended: {rec['name']}: expected {report['metric']} {rec['score']:.3f} ({rec['num_samples']} "
          f"samples), {rec['price_ms_per_image']:.2f} ms/image priced, "
          f"{'-' if measured is None else f'{measured:.2f}'} ms/image measured")
    if report["recommended_fixed"] != report["recommended"] and report["recommended_fixed"]:
        print(f"best fixed schedule (exportable): {report['recommended_fixed']}")
    for text in (report.get("latency_check") or {}).get("warnings", []):
        print(f"WARNING: {text}")
    t = report["timings"]
    print(f"tune wall time {t['total_s']:.1f} s ({t['evaluations']} evaluations, {t['images_generated']} images "
          f"generated); wrote {args.out}")


def _export(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from flowturbo.export.export_cli import default_model_dir
    from flowturbo.export.pipeline import ExportRequest, export_bundle
    from flowturbo.schedule import SamplingSchedule
    from flowturbo.training.bundle import load_bundle

    fixed = next((r for r in report["candidates"] if r["name"] == report["recommended_fixed"]), None)
    if fixed is None:
        raise FlowTurboError("no fixed schedule fits the budget: nothing to export")
    schedule = SamplingSchedule.from_dict(fixed["schedule"])
    folder = Path(args.model) if args.model else default_model_dir()
    bundle = load_bundle(folder, device="cpu")
    formats = _export_formats(args)
    result = export_bundle(bundle, ExportRequest(schedule=schedule, formats=formats), args.export,
                           source="embedded default" if args.model is None else str(folder.resolve()),
                           command=" ".join(["flowturbo", *sys.argv[1:]]), overwrite=args.overwrite)
    print(f"exported {fixed['name']} -> {result.path} ({', '.join(formats)})")


__all__ = ["add_tune_parser", "run_tune", "state_path_for", "table_text"]
