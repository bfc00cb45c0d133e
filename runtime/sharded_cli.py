"""``torchrun --nproc_per_node N -m flowturbo sample | eval ...``: the commands with their images split over ranks.

:mod:`flowturbo.runtime.distributed` says how the work is split and how failures end a run; this module is
the ``sample`` and ``eval`` flow on top of it. ``runtime/cli.py`` hands over here when ``WORLD_SIZE > 1``.

* ``sample``: every rank samples its batches (image i from seed ``seed + i``) and writes its PNGs into rank 0's
  staging folder; rank 0 reads them back for ``grid.png``, writes ``run.json`` (with ``world_size`` and each
  rank's times) and swaps the folder into place once every rank succeeded.
* ``eval``: every rank samples (or reads its part of ``--samples``) and extracts its features; rank 0 gathers
  features and the domain classifier's predictions, scores them exactly as a single process does
  (:func:`flowturbo.training.evaluation.score_features`), prints the JSON and writes ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from flowturbo import __version__
from flowturbo.errors import FlowTurboError
from flowturbo.fileio import OutputFolder, atomic_write_json, crash_point, json_text
from flowturbo.runtime.distributed import Ranks, process_group

DEFAULT_SHARD_BATCH = 16  # images per batch under torchrun when --batch is not given (the unit of the split)


def _load_sampler(args: argparse.Namespace, ranks: Ranks) -> tuple[Any, Any, list[Any], list[str] | None, str]:
    """(sampler, schedule or None for exported, requests — class ids, or one prompt per image for a ``--pipeline``
    model —, class names, source) on this rank's device."""
    from flowturbo.runtime.cli import _parse_classes, _pipeline_options, schedule_from_args

    device = ranks.device(args.device)
    if getattr(args, "pipeline", None) is not None:  # a text-to-image pipeline folder (runtime/text_cli.py)
        from flowturbo.families import ImageSize
        from flowturbo.runtime.text_cli import load_text_sampler, requests

        on_rank = argparse.Namespace(**{**vars(args), "device": device})
        sampler = load_text_sampler(on_rank, lambda parse: schedule_from_args(args, parse))
        size = ImageSize.parse(args.size) if args.size is not None else None
        channels: Any = "default" if args.guidance_channels is None else args.guidance_channels
        schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg, channels, size))
        return sampler, schedule, requests(args), None, f"model {sampler.pipeline.source}"
    if getattr(args, "artifacts", None) is not None:
        import torch

        from flowturbo.runtime.backends import load_exported_sampler

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        sampler = load_exported_sampler(args.artifacts, args.backend, device=None if device == "auto" else device,
                                        threads=args.threads)
        if getattr(sampler, "takes_prompts", False):
            raise FlowTurboError(f"{args.artifacts} is a text-to-image export: under torchrun, sample the pipeline "
                                 "folder (--pipeline) or run the export in one process")
        classes = _parse_classes(args.classes, sampler.num_classes, args.num_images)
        return sampler, None, classes, sampler.class_names, f"artifacts {args.artifacts}"
    from flowturbo.runtime.sampler import Sampler

    options = _pipeline_options(args)
    options["device"] = device
    sampler = Sampler.from_bundle(args.model, **options)
    channels: Any = "default" if args.guidance_channels is None else args.guidance_channels
    schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg, channels))
    classes = _parse_classes(args.classes, sampler.pipeline.num_classes, args.num_images)
    return sampler, schedule, classes, sampler.pipeline.class_names, f"model {sampler.pipeline.source}"


def run_sample(args: argparse.Namespace) -> int:
    """``flowturbo sample`` under torchrun (see the module docstring)."""
    import torch

    from flowturbo.runtime.cli import check_sample_args, timing_table
    from flowturbo.runtime.images import RUN_RECORD, read_image_files, to_uint8, write_grid, write_image_files

    check_sample_args(args)
    batch = args.batch or DEFAULT_SHARD_BATCH
    started = time.perf_counter()
    with process_group(args.device) as ranks, contextlib.ExitStack() as output:

        def open_output() -> str | None:
            if not ranks.is_main:
                return None
            out = output.enter_context(OutputFolder(args.out, command="sample", what="output", wait=args.wait))
            return str(output.enter_context(out.staging()))

        staging = Path(ranks.broadcast(ranks.run_all(open_output, "checking --out"), "sharing the staging folder"))
        t_load = time.perf_counter()
        sampler, schedule, classes, class_names, source = ranks.run_all(lambda: _load_sampler(args, ranks),
                                                                        "loading the model")
        load_s = time.perf_counter() - t_load
        start, stop = ranks.shard(len(classes), batch)

        text = getattr(args, "pipeline", None) is not None

        def work() -> dict[str, Any]:
            crash_point(f"rank{ranks.rank}:sampling")
            if stop == start:
                return {"rank": ranks.rank, "images": 0, "sample_s": 0.0, "decode_s": 0.0}
            common = dict(schedule=schedule, seed=args.seed, batch_size=batch,
                          progress=ranks.is_main and not args.no_progress, first_index=start)
            if text:  # image i: prompt i of the cycled list, seed + i, whichever rank samples it
                from flowturbo.families import ImageSize
                from flowturbo.runtime.text_cli import prompt_names

                samples = sampler.sample(prompts=classes[start:stop], negative_prompt=args.negative_prompt,
                                         guidance=args.guidance,
                                         size=ImageSize.parse(args.size) if args.size is not None else None,
                                         **common)
                labels, names = samples.labels, prompt_names(samples.prompts)  # this rank's distinct prompts
            else:
                samples = sampler.sample(classes[start:stop], **common)
                labels, names = classes[start:stop], class_names
            write_image_files(staging, to_uint8(samples.images), labels, names, first_index=start,
                              total=len(classes))
            crash_point(f"rank{ranks.rank}:images-written")
            return {"rank": ranks.rank, "images": stop - start, "first_index": start,
                    "sample_s": samples.times.sample_s, "decode_s": samples.times.decode_s,
                    "schedule": samples.schedule, "conditioning": samples.conditioning}

        mine = ranks.run_all(work, "sampling")
        per_rank = ranks.gather(mine, "gathering the ranks' times")

        def finish() -> None:
            if not ranks.is_main:
                return
            assert per_rank is not None
            used = next(r["schedule"] for r in per_rank if r.get("schedule") is not None)
            write_grid(staging, read_image_files(staging), args.grid_scale)
            wall_s = time.perf_counter() - started
            record: dict[str, Any] = {
                "flowturbo_version": __version__, "backend": getattr(sampler, "backend", "pytorch"),
                "model": sampler.describe() if hasattr(sampler, "describe") else sampler.pipeline.describe(),
                "seed": args.seed, "command": " ".join(["torchrun ... -m flowturbo", *sys.argv[1:]]),
                "torch_version": torch.__version__, "host": platform.node(), "seconds_load": load_s,
                "world_size": ranks.world_size, "distributed_backend": ranks.backend, "batch": batch,
                "schedule": used.describe(), "predictor_calls": used.predictor_calls,
                "refiner_calls": used.refiner_calls, "labels": classes, "num_images": len(classes),
                "seconds_wall": wall_s,
                "ranks": [{k: v for k, v in r.items() if k not in ("schedule", "conditioning")} for r in per_rank],
            }
            if text:  # as one process records it: the distinct prompts, image i's label indexing them
                index = {prompt: i for i, prompt in enumerate(dict.fromkeys(classes))}
                record.update(prompts=list(index), labels=[index[p] for p in classes],
                              conditioning=next(r["conditioning"] for r in per_rank if r.get("conditioning")))
            (staging / RUN_RECORD).write_text(json_text(record))
            print(f"flowturbo sample: {used}, {len(classes)} images over {ranks.world_size} processes "
                  f"({ranks.backend}), batches of {batch}, {source}")
            rows = [(f"rank {r['rank']} sample", r["sample_s"], r["images"] or None) for r in per_rank]
            rows += [(f"rank {r['rank']} decode", r["decode_s"], r["images"] or None) for r in per_rank]
            rows.append(("wall (all)", wall_s, len(classes)))
            print(timing_table(rows))

        ranks.run_all(finish, "writing the run record")
        ranks.run_all(output.close if ranks.is_main else (lambda: None), "moving the output into place")
        if ranks.is_main:
            print(f"wrote {Path(args.out) / 'grid.png'}, {len(classes)} PNGs and {Path(args.out) / RUN_RECORD}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``flowturbo eval`` under torchrun (see the module docstring)."""
    import numpy as np

    from flowturbo.runtime.cli import (
        _check_eval_result_file,
        _pipeline_options,
        check_eval_sampling_args,
        check_out_parent,
        eval_features,
        schedule_from_args,
    )
    from flowturbo.training.evaluation import DomainFeatures, score_features

    check_eval_sampling_args(args)
    with process_group(args.device) as ranks, contextlib.ExitStack() as stack:

        def preflight() -> None:
            if ranks.is_main and args.out:
                from flowturbo.fileio import lock_target

                check_out_parent(args.out)
                if Path(args.out).is_dir():
                    raise FlowTurboError(f"--out {args.out} is a folder; give the path of the JSON file to write")
                _check_eval_result_file(Path(args.out))
                stack.enter_context(lock_target(args.out, wait=args.wait))

        ranks.run_all(preflight, "checking --out")
        device = ranks.device(args.device)
        device = "cpu" if device in (None, "auto") else device

        def work() -> dict[str, Any]:
            import torch

            from flowturbo.runtime.images import read_sample_folder
            from flowturbo.runtime.sampler import Sampler

            classifier, extractor = eval_features(args, device)
            info: dict[str, Any] = {}
            if args.samples is not None:
                images, labels, record = read_sample_folder(args.samples)
                start, stop = ranks.shard(len(labels), args.batch)
                images, labels = images[start:stop], labels[start:stop]
                info.update(samples=str(args.samples), schedule=record.get("schedule", {}).get("notation"))
                ms = None
            else:
                options = _pipeline_options(args)
                options["device"] = device
                sampler = Sampler.from_bundle(args.model, **options)
                schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg))
                all_labels = [i % sampler.pipeline.num_classes for i in range(args.num_samples)]
                start, stop = ranks.shard(len(all_labels), args.batch)
                labels = all_labels[start:stop]
                crash_point(f"rank{ranks.rank}:sampling")
                if labels:
                    samples = sampler.sample(labels, schedule=schedule, seed=args.seed, batch_size=args.batch,
                                             progress=ranks.is_main, first_index=start)
                    images, ms = samples.images, samples.ms_per_image
                else:
                    images, ms = torch.empty(0), None
                info.update(schedule=schedule.notation, cfg=schedule.guidance_scale, seed=args.seed)
            if len(labels):
                feats = extractor.extract(images, progress=False).numpy()
                judge = DomainFeatures(classifier, device=device) if classifier is not None else None
                predicted = judge.predict(images).numpy() if judge is not None else None
            else:
                feats, predicted = np.zeros((0, extractor.dim), np.float32), None
            return {"features": feats, "predicted": predicted, "labels": list(labels), "info": info,
                    "ms_per_image": ms, "name": extractor.name, "extractor": extractor if ranks.is_main else None}

        mine = ranks.run_all(work, "sampling and extracting features")
        gathered = ranks.gather({k: v for k, v in mine.items() if k != "extractor"}, "gathering features on rank 0")

        def score() -> None:
            if not ranks.is_main:
                return
            assert gathered is not None
            feats = np.concatenate([g["features"] for g in gathered])
            labels = [c for g in gathered for c in g["labels"]]
            predicted = (np.concatenate([g["predicted"] for g in gathered if g["predicted"] is not None])
                         if all(g["predicted"] is not None for g in gathered if g["labels"]) else None)
            result = score_features(feats, features=mine["extractor"], labels=labels if predicted is not None else None,
                                    predicted=predicted, reference=args.reference, num_reference=args.num_reference,
                                    allow_small_sample=args.allow_small_sample)
            result.update(mine["info"])
            times = [g["ms_per_image"] for g in gathered if g["ms_per_image"] is not None]
            if times:
                result["ms_per_image_per_rank"] = times
            result["world_size"] = ranks.world_size
            if result.get("warning"):  # --allow-small-sample: loud on stderr too, as in one process
                print(result["warning"], file=sys.stderr)
            print(json.dumps(result, indent=2, sort_keys=True))
            if args.out:
                atomic_write_json(args.out, result)

        ranks.run_all(score, "scoring on rank 0")
    return 0


__all__ = ["DEFAULT_SHARD_BATCH", "run_eval", "run_sample"]
