"""``flowturbo train autoencoder|predictor|refiner|package``: thin argparse groups over the trainers.

Each trainer starts from a named preset (``--preset``; plain data in the trainer modules) or a saved
``config.json`` (``--config``), then applies the flags given on the command line. Every flag maps to one
dotted field of the trainer's frozen config dataclass (``--lr`` -> ``loop.lr``), so the CLI holds no logic.
Multi-GPU / multi-process: run the same command under ``torchrun --nproc_per_node N -m
flowturbo.training.train_cli train ...`` (or the ``flowturbo`` entry point).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flowturbo.cliargs import (
    GUIDANCE_SCALE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    ArgumentParser,
    Number,
    input_path,
    output_path,
    run_command,
)
from flowturbo.errors import FlowTurboError
from flowturbo.families import diffusers_pipeline_class

# (flag, dotted config paths, argparse kwargs)
Option = tuple[str, tuple[str, ...], dict[str, Any]]
LABEL_DROPOUT = Number(float, low=0, high=1, high_open=True)  # a probability below 1 (1: never conditioned)
PROBABILITY = Number(float, low=0, high=1)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _loop_options(prefix: str = "loop", flag_prefix: str = "") -> list[Option]:
    p, f = prefix, flag_prefix
    return [
        (f"--{f}steps", (f"{p}.steps",), dict(type=POSITIVE_INT, help="optimizer steps")),
        (f"--{f}batch-size", (f"{p}.batch_size",), dict(type=POSITIVE_INT, help="global batch (split over processes)")),
        (f"--{f}lr", (f"{p}.lr",), dict(type=POSITIVE, help="AdamW learning rate (constant after warm-up)")),
        (f"--{f}weight-decay", (f"{p}.weight_decay",), dict(type=NON_NEGATIVE)),
        (f"--{f}warmup-steps", (f"{p}.warmup_steps",), dict(type=NON_NEGATIVE_INT, help="linear lr warm-up steps")),
        (f"--{f}grad-clip", (f"{p}.grad_clip",), dict(type=NON_NEGATIVE, help="max gradient norm (0: off)")),
        (f"--{f}ema-decay", (f"{p}.ema_decay",), dict(type=Number(float, low=0, high=1, high_open=True))),
    ]


def _runtime_options(*loops: str) -> list[Option]:
    """Run settings; each applies to every LoopConfig named in ``loops`` (e.g. both autoencoder stages)."""

    def paths(name: str) -> tuple[str, ...]:
        return tuple(f"{loop}.{name}" for loop in loops)

    return [
        ("--precision", paths("precision"),
         dict(choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, fp32 on CPU")),
        ("--device", paths("device"), dict(choices=["auto", "cpu", "cuda"])),
        ("--seed", paths("seed"), dict(type=SEED)),
        ("--log-every", paths("log_every"), dict(type=POSITIVE_INT, help="progress-bar update interval (steps)")),
        ("--ckpt-every", paths("ckpt_every"), dict(type=POSITIVE_INT, help="checkpoint interval (steps)")),
        ("--keep-checkpoints", paths("keep_checkpoints"),
         dict(type=NON_NEGATIVE_INT, help="newest checkpoints kept (0: all)")),
        ("--max-minutes", ("loop.max_minutes",), dict(type=POSITIVE, help="stop cleanly and save after this long")),
        ("--budget-ends-run", ("loop.budget_ends_run",),
         dict(action="store_const", const=True,
              help="a --max-minutes stop finishes the run (final weights written) instead of pausing it")),
        ("--num-workers", paths("num_workers"),
         dict(type=NON_NEGATIVE_INT, help="DataLoader workers for image folders")),
        ("--no-progress", paths("progress"), dict(action="store_const", const=False, help="no progress bar")),
    ]


RUNTIME_OPTIONS = _runtime_options("loop")


def _image_options(prefix: str, also_model: bool = False) -> list[Option]:
    model_size = ("model.image_size",) if also_model else ()
    model_channels = ("model.image_channels",) if also_model else ()
    return [
        ("--dataset", (f"{prefix}.dataset",),
         dict(type=input_path("--dataset", keywords=("fashion-mnist",)),
              help="'fashion-mnist' or an ImageNet-layout folder root/<class>/*.png")),
        ("--split", (f"{prefix}.split",), dict(choices=["train", "test"], help="Fashion-MNIST split")),
        ("--fashion-mnist-root", (f"{prefix}.fashion_mnist_root",),
         dict(type=input_path("--fashion-mnist-root"), help="folder of the idx files")),
        ("--limit", (f"{prefix}.limit",), dict(type=POSITIVE_INT, help="use only the first N images")),
        ("--image-size", (f"{prefix}.image_size", *model_size),
         dict(type=POSITIVE_INT, help="center-crop size (folders)")),
        ("--image-channels", (f"{prefix}.image_channels", *model_channels), dict(type=int, choices=[1, 3])),
        ("--no-flip", (f"{prefix}.random_flip",), dict(action="store_const", const=False, help="no horizontal flips")),
    ]


LATENT_OPTIONS: list[Option] = [
    ("--autoencoder", ("data.autoencoder",),
     dict(type=input_path("--autoencoder"), help="our autoencoder: `train autoencoder` run folder or file")),
    ("--vae", ("data.vae",),
     dict(type=input_path("--vae"), help="diffusers AutoencoderKL folder (sd-vae-ft-ema / sd-vae-ft-mse)")),
    ("--encoder-bundle", ("data.encoder_bundle",),
     dict(type=input_path("--encoder-bundle"),
          help="a bundle folder whose image encoder encodes the data (e.g. the embedded default's "
               "flowturbo/runtime/assets/default_model: train a refiner for its predictor)")),
    ("--vae-latent-scale", ("data.vae_latent_scale",), dict(type=POSITIVE, help="default: the VAE's scaling_factor")),
    ("--no-pre-encode", ("data.pre_encode",),
     dict(action="store_const", const=False, help="encode every batch instead of the whole dataset once")),
    ("--encode-batch-size", ("data.encode_batch_size",), dict(type=POSITIVE_INT)),
]

AUTOENCODER_OPTIONS: list[Option] = [
    ("--latent-channels", ("model.latent_channels",), dict(type=POSITIVE_INT)),
    ("--base-channels", ("model.base_channels",), dict(type=POSITIVE_INT)),
    ("--channel-mult", ("model.channel_mult",),
     dict(type=_ints, help="e.g. 1,2,4 (len - 1 = number of 2x downsamples)")),
    ("--num-res-blocks", ("model.num_res_blocks",), dict(type=POSITIVE_INT)),
    ("--norm-groups", ("model.norm_groups",), dict(type=POSITIVE_INT)),
    ("--recon-loss", ("recon_loss",), dict(choices=["l1", "mse"])),
    ("--kl-weight", ("kl_weight",), dict(type=NON_NEGATIVE)),
    ("--latent-scale-images", ("latent_scale_images",),
     dict(type=POSITIVE_INT, help="images used to measure the scale")),
    ("--no-finetune", ("finetune_decoder",),
     dict(action="store_const", const=False, help="skip the 'mse' decoder stage")),
]

PREDICTOR_OPTIONS: list[Option] = [
    ("--model", ("model",), dict(help="SiT preset, e.g. SiT-M/2, SiT-T/2, SiT-XL/2")),
    ("--learn-sigma", ("learn_sigma",), dict(action="store_const", const=True, help="2C output channels (official)")),
    ("--label-dropout", ("label_dropout",), dict(type=LABEL_DROPOUT, help="probability of the null label (CFG)")),
]

REFINER_OPTIONS: list[Option] = [
    ("--teacher", ("teacher",),
     dict(type=input_path("--teacher"), help="predictor: `train predictor` run folder/file or official SiT .pt")),
    ("--teacher-model", ("teacher_model",), dict(help="insist the teacher is this preset, e.g. SiT-XL/2")),
    ("--trust-pickle", ("trust_pickle",), dict(action="store_const", const=True, help="allow full unpickling")),
    ("--refiner-depth", ("refiner_depth",), dict(type=POSITIVE_INT)),
    ("--label-dropout", ("label_dropout",), dict(type=LABEL_DROPOUT)),
    ("--init-from", ("init_from",),
     dict(type=input_path("--init-from"),
          help="start from this refiner's weights (`train refiner` run/file or official .pt; a refiner without dt "
               "conditioning starts a --dt-conditioning one exactly)")),
]

# The velocity age dt the refiner is trained on (flowturbo.refiner_dt.DtDistribution; docs/refiner_dt.md). Ranges
# are checked at parse time; the pairs (e.g. --dt-small-max <= --max-dt) by DtDistribution, before any work.
REFINER_DT_OPTIONS: list[Option] = [
    ("--max-dt", ("dt.max_dt",), dict(type=Number(float, low=0, low_open=True, high=1),
                                      help="longest step: dt ~ U(0, max_dt] (paper: 0.12); recorded with the weights "
                                           "as the trained range")),
    ("--dt-small-share", ("dt.small_share",),
     dict(type=PROBABILITY, help="probability of dt ~ U(0, dt_small_max] instead")),
    ("--dt-small-max", ("dt.small_max",),
     dict(type=Number(float, low=0, low_open=True, high=1), help="the short steps' upper end")),
    ("--dt-zero-share", ("dt.zero_share",), dict(type=PROBABILITY, help="probability of dt = 0 exactly (the first R "
                                                                       "call after an H/P step)")),
    ("--dt-conditioning", ("dt_conditioning",),
     dict(action="store_const", const=True, help="the refiner takes dt as an input (a zero-initialised embedding)")),
    ("--no-dt-conditioning", ("dt_conditioning",),
     dict(action="store_const", const=False, help="no dt input (the paper's refiner; official layout)")),
]

# Reuse of the teacher's outputs (training.trainers.refiner.TeacherCacheConfig).
REFINER_CACHE_OPTIONS: list[Option] = [
    ("--teacher-cache-batches", ("cache.batches",),
     dict(type=NON_NEGATIVE_INT,
          help="pool of teacher samples, in batches per process (0: none, every step calls the teacher)")),
    ("--teacher-reuse", ("cache.reuse",),
     dict(type=POSITIVE_INT,
          help="steps per recomputed pool batch: each teacher sample serves this many steps on average")),
]


# A diffusers text-to-image teacher (training.trainers.text_refiner.TextRefinerTrainConfig): `train refiner
# --teacher PIPELINE_FOLDER --prompts FILE` samples its own training states. Flags of the SiT teacher's data
# (--dataset, --autoencoder, ...) do not apply to it, nor these to a SiT teacher: each is refused with the other.
TEXT_REFINER_OPTIONS: list[Option] = [
    ("--prompts", ("prompts",),
     dict(type=input_path("--prompts"), help="text-to-image teacher: a UTF-8 file of prompts, one per line, that the "
                                             "teacher samples its training trajectories from")),
    ("--negative-prompt", ("negative_prompt",), dict(help="text-to-image teacher: the negative prompt of its CFG")),
    ("--size", ("size",), dict(help="text-to-image teacher: image size WIDTHxHEIGHT of the trajectories (default: "
                                    "the model's)")),
    ("--cfg", ("cfg",), dict(type=GUIDANCE_SCALE, help="text-to-image teacher: the CFG scale of the velocity the "
                                                       "refiner corrects (default: the model's, SD3 7)")),
    ("--guidance", ("guidance",), dict(type=NON_NEGATIVE, help="text-to-image teacher: FLUX.1-dev's distilled "
                                                               "guidance value (default 3.5)")),
    ("--max-sequence-length", ("max_sequence_length",), dict(type=POSITIVE_INT, help="text-to-image teacher: T5 "
                                                                                     "tokens per prompt")),
    ("--fine-steps", ("trajectories.fine_steps",),
     dict(type=POSITIVE_INT, help="text-to-image teacher: Heun steps of the fine grid it samples (default 32)")),
    ("--trajectories-per-prompt", ("trajectories.per_prompt",),
     dict(type=POSITIVE_INT, help="text-to-image teacher: noise draws per prompt (default 4)")),
    ("--trajectory-batch", ("trajectories.batch",),
     dict(type=POSITIVE_INT, help="text-to-image teacher: trajectories sampled at once")),
    ("--refiner-width", ("hidden_size",),
     dict(type=POSITIVE_INT, help="text-to-image teacher: the refiner block's width (default: the teacher's)")),
    ("--refiner-heads", ("num_heads",),
     dict(type=POSITIVE_INT, help="text-to-image teacher: attention heads (default: the teacher's)")),
]
SIT_ONLY_REFINER_FLAGS = ("--teacher-model", "--trust-pickle", "--label-dropout", "--init-from")


# --------------------------------------------------------------------------------------- config glue
def replace_paths(config: Any, updates: dict[str, Any]) -> Any:
    """``dataclasses.replace`` of several dotted paths of nested frozen dataclasses, one ``replace`` per dataclass
    with all of its changes, so it validates them together (``--max-dt`` and ``--dt-small-max`` given at once
    are never checked one without the other)."""
    names = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    nested: dict[str, dict[str, Any]] = {}
    changes: dict[str, Any] = {}
    for path, value in updates.items():
        head, _, rest = path.partition(".")
        if head not in names:
            raise FlowTurboError(f"unknown config field {path!r} for {type(config).__name__}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = value
    for head, inner in nested.items():
        changes[head] = replace_paths(getattr(config, head), inner)
    return dataclasses.replace(config, **changes)


def _field_default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    raise FlowTurboError(f"{cls.__name__}.{name} has no default; give it on the command line")


def _initial_kwargs(cls: type, presets: dict[str, dict], preset: str | None, config_file: str | None) -> dict:
    """Top-level keyword arguments of ``cls`` from a preset (plain data) or a saved ``config.json``."""
    from flowturbo.training.trainers.common import config_from_dict

    if config_file is None:
        name = preset or next(iter(presets))
        if name not in presets:
            raise FlowTurboError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return dict(presets[name])
    if preset is not None:
        raise FlowTurboError("give --preset or --config, not both")
    path = Path(config_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlowTurboError(f"cannot read config {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run folder's config.json
    if not isinstance(data, dict):
        raise FlowTurboError(f"{path} does not hold a config object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FlowTurboError(f"{path}: unknown {cls.__name__} keys {unknown}")
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return kwargs


def build_config(cls: type, presets: dict[str, dict], args: argparse.Namespace, options: Sequence[Option]) -> Any:
    """Preset (or ``--config`` file), then every flag the user gave; the dataclass validates the result.

    ``--resume`` without ``--preset`` / ``--config`` starts from the run's own saved settings (``--out``'s
    ``config.json``), so ``train refiner --resume --out RUN`` continues a run without repeating its flags."""
    config_file = getattr(args, "config", None)
    if config_file is None and getattr(args, "resume", False) and getattr(args, "preset", None) is None:
        saved = Path(str(args.out)) / "config.json"
        config_file = str(saved) if saved.is_file() else None
    kwargs = _initial_kwargs(cls, presets, getattr(args, "preset", None), config_file)
    nested: dict[str, dict[str, Any]] = {}  # top-level field -> {dotted rest: value}: applied together
    for _flag, paths, _kwargs in options:
        value = getattr(args, _dest(paths), None)
        if value is None:
            continue
        for path in paths:
            head, _, rest = path.partition(".")
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                kwargs[head] = value
    for head, updates in nested.items():
        current = kwargs[head] if head in kwargs else _field_default(cls, head)
        kwargs[head] = replace_paths(current, updates)
    return cls(**kwargs)


def _dest(paths: tuple[str, ...]) -> str:
    return "cfg__" + paths[0].replace(".", "__")


def _add_options(parser: argparse.ArgumentParser, title: str, options: Sequence[Option]) -> None:
    group = parser.add_argument_group(title)
    for flag, paths, kwargs in options:
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs = {"metavar": flag.lstrip("-").replace("-", "_").upper(), **kwargs}
        group.add_argument(flag, dest=_dest(paths), default=None, **kwargs)


def _add_run_group(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, type=output_path("--out"),
                       help="output folder (checkpoints, config.json, loss_curve.png); a new run refuses a folder "
                            "holding files flowturbo did not write, and any run refuses another kind of flowturbo "
                            "output or another command's run")
    group.add_argument("--preset", default=None, choices=sorted(presets), help=f"default: {next(iter(presets))}")
    group.add_argument("--config", default=None, help="start from a saved config.json instead of a preset")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    group.add_argument("--force", action="store_true", help="resume even though the training settings changed (lists "
                                                         "changes; another model architecture is always refused)")
    group.add_argument("--wait", action="store_true",
                       help="if another flowturbo process is writing --out, wait for it instead of failing at once")


# ------------------------------------------------------------------------------------------- commands
def _trainer_command(cls_name: str, presets_name: str, train_name: str,
                     options: Sequence[Option]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from flowturbo.training import trainers

        cls, presets, train = (getattr(trainers, n) for n in (cls_name, presets_name, train_name))
        config = build_config(cls, presets, args, options)
        check_inputs_exist(config)
        with _locked_run_folder(args.out, f"train {args.train_command}", args.wait, args.resume):
            out = train(config, args.out, resume=args.resume, force=args.force)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            print(f"done: {out}")
        return 0

    return run


# Config fields naming files or folders a trainer reads, with the flag that sets them: checked to exist before
# anything runs (a trainer encodes its whole dataset before it loads the teacher, say).
INPUT_FIELDS = (("teacher", "--teacher"), ("data.autoencoder", "--autoencoder"), ("data.vae", "--vae"))


def check_inputs_exist(config: Any) -> None:
    """Refuse a training config whose teacher / autoencoder / VAE path does not exist, before any work."""
    for path, flag in INPUT_FIELDS:
        value: Any = config
        for name in path.split("."):
            value = getattr(value, name, None)
        if isinstance(value, str) and value and not os.path.exists(value):
            raise FlowTurboError(f"{flag} {value} not found; check the path (a run folder, a file, or for --vae a "
                                 "diffusers AutoencoderKL folder)")
        if flag == "--teacher" and isinstance(value, str) and value and hasattr(config, "prompts"):
            from flowturbo.training.families import recognize_pipeline

            recognize_pipeline(value, flag)  # a folder that is not a supported pipeline: one error naming it


def _locked_run_folder(out: str, command: str, wait: bool, resume: bool) -> contextlib.AbstractContextManager:
    """Pre-flight + lock + debris removal of a run folder (rank 0 only: torchrun's other ranks write nothing).

    A new run refuses a folder holding files flowturbo did not write; a resumed one only adds files.
    """
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    from flowturbo.fileio import owned_run_folder

    return owned_run_folder(out, command=command, wait=wait, what="training run folder", check_owned=not resume)


def _refiner_command(sit: Callable[[argparse.Namespace], int], text: Callable[[argparse.Namespace], int],
                     sit_opts: Sequence[Option], text_opts: Sequence[Option]) -> Callable[[argparse.Namespace], int]:
    """``train refiner``: the SiT trainer, or the text-to-image one when ``--teacher`` is a diffusers pipeline folder
    (or a resumed run says it is one); flags of the other kind are refused naming the teacher."""

    def given(args: argparse.Namespace, options: Sequence[Option]) -> list[str]:
        return [flag for flag, paths, _ in options if getattr(args, _dest(paths), None) is not None]

    def run(args: argparse.Namespace) -> int:
        teacher = getattr(args, _dest(("teacher",)), None)
        if teacher is not None:
            is_text = diffusers_pipeline_class(teacher) is not None
        else:  # resuming a run (or a --config): its saved settings say which trainer
            saved = args.config or (str(Path(str(args.out)) / "config.json") if args.resume else None)
            is_text = _saved_kind(saved) == "text-to-image"
        if args.preset is not None:
            from flowturbo.training.trainers.text_refiner import TEXT_REFINER_TRAIN_PRESETS

            if is_text and args.preset not in TEXT_REFINER_TRAIN_PRESETS:
                raise FlowTurboError(f"--preset {args.preset} is a SiT-teacher preset; a text-to-image teacher takes "
                                     f"{' or '.join(sorted(TEXT_REFINER_TRAIN_PRESETS))}")
        wrong = given(args, sit_opts if is_text else text_opts)
        other = {flag for flag, _, _ in (text_opts if is_text else sit_opts)}
        wrong = [flag for flag in wrong if flag not in other]
        if wrong:
            what = ("a text-to-image teacher (a diffusers pipeline folder)" if is_text else
                    "a SiT teacher (a `train predictor` run or an official checkpoint)")
            raise FlowTurboError(f"{wrong[0]} does not apply to {what}; drop it")
        return (text if is_text else sit)(args)

    return run


def _saved_kind(path: str | None) -> str | None:
    """The ``kind`` of a saved trainer config (a run folder's config.json or a --config file), if it names one."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    data = data.get("config", data) if isinstance(data, dict) else None
    return data.get("kind") if isinstance(data, dict) else None


def _run_package(args: argparse.Namespace) -> int:
    from flowturbo.training.token_refiner import is_token_refiner
    from flowturbo.training.trainers.package import package_bundle

    if args.refiner is not None and is_token_refiner(args.refiner):
        return _run_text_package(args)
    if args.predictor is None:
        raise FlowTurboError("--predictor is required (a `train predictor` run or an official SiT .pt); a refiner "
                             "trained for a diffusers pipeline folder is packaged without one")

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    bundle = package_bundle(
        args.out, predictor=args.predictor, refiner=args.refiner, autoencoder=args.autoencoder, vae=args.vae,
        decoder_bundle=args.decoder_bundle,
        variant=args.variant, schedule=args.schedule, cfg=args.cfg, guidance_channels=args.guidance_channels,
        class_names=names, trust_pickle=args.trust_pickle, overwrite=args.overwrite, wait=args.wait,
        inpaint_schedule=args.inpaint_schedule,
    )
    counts = ", ".join(f"{k} {v:,}" for k, v in bundle.parameter_counts().items())
    print(f"wrote bundle {args.out} ({counts} parameters; default schedule {bundle.defaults.schedule})")
    return 0


def _run_text_package(args: argparse.Namespace) -> int:
    """``train package --refiner RUN`` of a refiner for a diffusers teacher: a bundle pointing at the folder."""
    from flowturbo.training.text_bundle import package_text_bundle

    others = [flag for flag, value in (("--predictor", args.predictor), ("--autoencoder", args.autoencoder),
                                       ("--vae", args.vae), ("--decoder-bundle", args.decoder_bundle),
                                       ("--variant", args.variant), ("--cfg", args.cfg),
                                       ("--guidance-channels", args.guidance_channels),
                                       ("--class-names", args.class_names)) if value is not None]
    if others:
        raise FlowTurboError(f"{others[0]} does not apply: --refiner {args.refiner} was trained for a diffusers "
                             "pipeline folder, which holds the predictor, text encoders and VAE (the bundle points at "
                             "it) and fixes the CFG the refiner corrects")
    bundle = package_text_bundle(args.out, refiner=args.refiner, schedule=args.schedule,
                                 inpaint_schedule=args.inpaint_schedule, overwrite=args.overwrite, wait=args.wait)
    print(f"wrote text bundle {args.out} (refiner for {bundle.pipeline}; default schedule {bundle.schedule} at CFG "
          f"{bundle.cfg:g}{'' if bundle.guidance is None else f', guidance {bundle.guidance:g}'})")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` (with ``autoencoder``, ``predictor``, ``refiner``, ``package``) on ``subparsers``.

    Each leaf parser sets ``handler`` (``args -> exit code``); returns the ``train`` parser.
    """
    from flowturbo.training.trainers import (
        AUTOENCODER_TRAIN_PRESETS,
        PREDICTOR_TRAIN_PRESETS,
        REFINER_TRAIN_PRESETS,
        TEXT_REFINER_TRAIN_PRESETS,
    )

    train = subparsers.add_parser("train", help="train the autoencoder, a predictor or a refiner; package a bundle")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="WHAT")

    ae_runtime = _runtime_options("loop", "finetune")
    ae_opts = AUTOENCODER_OPTIONS + _image_options("data", also_model=True) + _loop_options() + ae_runtime + \
        _loop_options("finetune", "finetune-")
    p = sub.add_parser("autoencoder", help="our KL autoencoder, then its 'mse' decoder fine-tune")
    _add_run_group(p, AUTOENCODER_TRAIN_PRESETS)
    _add_options(p, "autoencoder", AUTOENCODER_OPTIONS)
    _add_options(p, "data", _image_options("data", also_model=True))
    _add_options(p, "optimisation", _loop_options())
    _add_options(p, "decoder fine-tune (the 'mse' variant)", _loop_options("finetune", "finetune-"))
    _add_options(p, "runtime (both stages; --max-minutes covers the whole run)", ae_runtime)
    p.set_defaults(handler=_trainer_command("AutoencoderTrainConfig", "AUTOENCODER_TRAIN_PRESETS",
                                            "train_autoencoder", ae_opts))

    latent_image_opts = _image_options("data.images")
    pred_opts = PREDICTOR_OPTIONS + latent_image_opts + LATENT_OPTIONS + _loop_options() + RUNTIME_OPTIONS
    p = sub.add_parser("predictor", help="a SiT predictor by flow matching on encoded latents")
    _add_run_group(p, PREDICTOR_TRAIN_PRESETS)
    _add_options(p, "predictor", PREDICTOR_OPTIONS)
    _add_options(p, "data", latent_image_opts)
    _add_options(p, "latents", LATENT_OPTIONS)
    _add_options(p, "optimisation", _loop_options())
    _add_options(p, "runtime", RUNTIME_OPTIONS)
    p.set_defaults(handler=_trainer_command("PredictorTrainConfig", "PREDICTOR_TRAIN_PRESETS", "train_predictor",
                                            pred_opts))

    ref_opts = (REFINER_OPTIONS + REFINER_DT_OPTIONS + REFINER_CACHE_OPTIONS + latent_image_opts + LATENT_OPTIONS
                + _loop_options() + RUNTIME_OPTIONS)
    p = sub.add_parser("refiner", help="a FlowTurbo velocity refiner against a frozen predictor (SiT) or a diffusers "
                                       "text-to-image pipeline folder (SD3 / FLUX.1: trained on its own trajectories)")
    _add_run_group(p, {**REFINER_TRAIN_PRESETS, **{k: v for k, v in TEXT_REFINER_TRAIN_PRESETS.items()
                                                   if k not in REFINER_TRAIN_PRESETS}})
    _add_options(p, "refiner", REFINER_OPTIONS)
    _add_options(p, "step sizes (dt)", REFINER_DT_OPTIONS)
    _add_options(p, "teacher cache", REFINER_CACHE_OPTIONS)
    _add_options(p, "data", latent_image_opts)
    _add_options(p, "latents", LATENT_OPTIONS)
    _add_options(p, "optimisation", _loop_options())
    _add_options(p, "runtime", RUNTIME_OPTIONS)
    _add_options(p, "text-to-image teacher (--teacher a diffusers flow-matching pipeline folder, e.g. SD3 / FLUX.1)",
                 TEXT_REFINER_OPTIONS)
    sit_refiner = _trainer_command("RefinerTrainConfig", "REFINER_TRAIN_PRESETS", "train_refiner", ref_opts)
    text_opts = ([o for o in REFINER_OPTIONS if o[0] not in SIT_ONLY_REFINER_FLAGS] + REFINER_DT_OPTIONS
                 + REFINER_CACHE_OPTIONS + TEXT_REFINER_OPTIONS + _loop_options() + RUNTIME_OPTIONS)
    text_refiner = _trainer_command("TextRefinerTrainConfig", "TEXT_REFINER_TRAIN_PRESETS", "train_text_refiner",
                                    text_opts)
    p.set_defaults(handler=_refiner_command(sit_refiner, text_refiner, ref_opts, text_opts))

    p = sub.add_parser("package", help="assemble predictor + refiner + decoder + encoder (EMA weights) into a bundle")
    g = p.add_argument_group("parts")
    g.add_argument("--predictor", default=None, type=input_path("--predictor"),
                   help="`train predictor` run folder/file or official SiT .pt (required, except for a refiner "
                        "trained for a diffusers pipeline folder: its bundle points at the folder)")
    g.add_argument("--refiner", default=None, type=input_path("--refiner"),
                   help="`train refiner` run folder/file or official refiner .pt")
    g.add_argument("--autoencoder", default=None, type=input_path("--autoencoder"),
                   help="`train autoencoder` run folder or autoencoder.safetensors")
    g.add_argument("--vae", default=None, type=input_path("--vae"),
                   help="diffusers AutoencoderKL folder instead of our autoencoder")
    g.add_argument("--decoder-bundle", default=None, type=input_path("--decoder-bundle"),
                   help="take the decoder (every variant), encoder and class names of this bundle (e.g. the embedded "
                        "default's runtime/assets/default_model, to give it a new refiner)")
    g.add_argument("--variant", default=None, choices=["ema", "mse"],
                   help="default decoder variant (both stored; default: ema, or the --decoder-bundle's own)")
    g.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of trusted .pt files")
    g = p.add_argument_group("sampling defaults")
    g.add_argument("--schedule", default=None, help="default schedule (H1P5R3 with a refiner, else H8)")
    g.add_argument("--inpaint-schedule", default=None,
                   help="default schedule of `flowturbo inpaint` (default: --schedule); R-heavy schedules can lose to "
                        "H/P steps there (QUALITY.md: H4 beats H1R3 on the embedded default)")
    g.add_argument("--cfg", type=GUIDANCE_SCALE, default=None, help="default guidance scale")
    g.add_argument("--guidance-channels", type=POSITIVE_INT, default=None,
                   help="guide only the first N channels (default: the model family's: 3 for official SiT "
                        "checkpoints, all for ours)")
    g.add_argument("--class-names", default=None, help="comma-separated (default: from the predictor run)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=output_path("--out"), help="bundle folder")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle (only a bundle holding nothing but flowturbo's own files; never "
                        "another kind of output)")
    g.add_argument("--wait", action="store_true", help="wait for another flowturbo process writing --out")
    p.set_defaults(handler=_run_package)
    return train


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m flowturbo.training.train_cli train ...``, e.g. under torchrun): the same
    parsing, input rule and torchrun handling as ``flowturbo train`` (:func:`flowturbo.cliargs.run_command`)."""
    parser = ArgumentParser(prog="flowturbo")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    return run_command(parser, list(sys.argv[1:] if argv is None else argv),
                       lambda args: f"train {args.train_command}")

if __name__ == "__main__":
    sys.exit(main())
