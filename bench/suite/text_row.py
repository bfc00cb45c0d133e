"""Row (t) of the GPU suite: text-to-image, an SD3.5-medium-shaped transformer at 1024x1024 (issue 21, item 6).

A **random-weight** ``diffusers.SD3Transformer2DModel`` with SD3.5-medium's published transformer config
(:data:`SD35_MEDIUM`), bf16 on CUDA, 1024x1024 images (latents 16x128x128: 4096 image tokens), random prompt
embeddings of the real shapes (CLIP 77 + T5 256 = 333 tokens x 4096, pooled 2048), CFG on (the transformer sees
[prompt; negative], batch 2 for one image), one image per batch. No text encoders and no VAE: it measures the
transformer-call part of sampling, ms per image, for several schedules side by side in one process:

* ``E28`` — the pipeline's default (28 Euler steps on its scheduler's shifted grid): the baseline;
* ``H8`` — 8 Heun steps (16 calls);
* ``H1P5`` — a FlowTurbo schedule without refiner steps (7 calls; the suite's H1P5R3 without its R steps: a
  refiner for this random model does not exist);
* ``H1P5`` again with our fused adaLN kernel swapped into the diffusers blocks
  (:func:`flowturbo.training.families.fused_adaln.fuse_adaln`, ``triton``) — the fusion's effect, same run, same
  schedule, same solver ops (needs Triton; in SD3.5 the 13 dual-attention blocks' ``SD35AdaLayerNormZeroX`` is not
  fused, the report says which modules are).

Every schedule goes through flowturbo's own path: the SD3 family adapter
(:class:`flowturbo.training.families.sd3.SD3Family`: its time grid from diffusers' own scheduler, its
``transformer_inputs`` / ``transformer_output``, its :class:`FlowMatchCalls`) and the integrator
(:func:`flowturbo.training.sampling.run_schedule`, reference solver ops, eager, no CUDA graph). The adapter is built
from a **configs-only** pipeline folder written here (``model_index.json`` + the transformer's, scheduler's and VAE's
``config.json``; no weights) and given the random transformer directly: ``FlowMatchFamily.attach`` wants a loaded
pipeline with its VAE, which this row does not build, so the lowest call that still runs through the adapter and the
integrator is ``run_schedule(schedule, noise, family.model_calls(conditioning, schedule))`` — what
``Sampler._integrate`` calls, without the decode.

The dry run (CPU) runs the same code on a tiny SD3-shaped config (:data:`DRY`): seconds, float32.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.faults import Faults
from suite.preflight import Capabilities
from suite.record import Recorder

ROW = "t"
TITLE = "text-to-image, SD3.5-medium-shaped"
SCHEDULES = ("E28", "H8", "H1P5")  # baseline first: the others are compared with it
FUSED_SCHEDULE = "H1P5"  # measured again with the fused adaLN
DIFFUSERS_WHEEL = "diffusers-0.42.1-py3-none-any.whl"  # what scripts/prepare_gpu_carry.sh downloads
CARRY_HINT = (f"carry the diffusers wheel: .devcarry/wheels/{DIFFUSERS_WHEEL} (bash scripts/prepare_gpu_carry.sh; "
              "BENCHMARKS.md, 'GPU suite'); its other requirements are on the device image")
SEED = 0

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (the Hub's; diffusers' SD3Transformer2DModel).
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# The same model class, tiny: two blocks (one dual-attention, so both norm kinds are there), width 16.
DRY = {
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
    "pooled_projection_dim": 16, "pos_embed_max_size": 16, "dual_attention_layers": [0], "qk_norm": "rms_norm",
}
# The pipeline's scheduler (static shift 3) and VAE (factor 8, 16 latent channels): configs only, never built.
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
# Image side (pixels), text tokens (CLIP 77 + T5 256), per-token width (= joint_attention_dim), pooled width.
GPU_SHAPES = {"image": 1024, "tokens": 77 + 256, "width": 4096, "pooled": 2048}
DRY_SHAPES = {"image": 64, "tokens": 12, "width": 32, "pooled": 16}


def write_config_folder(folder: Path, transformer: dict[str, Any]) -> Path:
    """A ``StableDiffusion3Pipeline`` folder of configs only (what the adapter reads; no weights, no tokenizers)."""
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}
    files = {"model_index.json": index,
             "transformer/config.json": {"_class_name": "SD3Transformer2DModel", **transformer},
             "scheduler/scheduler_config.json": SCHEDULER, "vae/config.json": VAE}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[], Any], replays: int, device: Any) -> tuple[list[float], Any]:
    """``replays`` timed calls of ``run`` (CUDA events on a GPU, wall clock on CPU): ms each, and the last output."""
    import torch

    times, out = [], None
    for _ in range(replays):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = run()
            times.append(1e3 * (time.perf_counter() - t0))
    return times, out


def run_text_row(rec: Recorder, dry: bool, device: Any, caps: Capabilities, faults: Faults, workdir: Path,
                 fits: Callable[[str, float], bool], estimate_s: float, warmup: int, replays: int) -> None:
    """Row (t) (module docstring); each schedule is recorded as it finishes (``text_rows``), the summary in
    ``text_row``. Missing diffusers: skipped with the wheel to carry. Never raises."""
    import traceback

    what = f"row:{ROW}"
    reason = caps.why_not("diffusers")
    if reason is not None:
        rec.skip(what, f"{reason}; {CARRY_HINT}")
        return
    if not fits(what, estimate_s):
        return
    try:
        _run(rec, dry, device, caps, faults, workdir, warmup, replays)
    except ImportError as exc:  # diffusers present but without what the row needs (or the fault)
        rec.skip(what, f"needs diffusers' SD3Transformer2DModel: {type(exc).__name__}: {exc}; {CARRY_HINT}")
    except Exception as exc:  # noqa: BLE001 - recorded; the record and the rest of the phase go on
        rec.error(what, f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        import gc

        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _run(rec: Recorder, dry: bool, device: Any, caps: Capabilities, faults: Faults, workdir: Path, warmup: int,
         replays: int) -> None:
    import dataclasses

    import torch

    import flowturbo  # noqa: F401 - first: the source tree's kernels/ must not shadow an installed `kernels`
    from flowturbo.families import ImageSize, PromptEmbeddings, TextConditioning
    from flowturbo.schedule import SamplingSchedule
    from flowturbo.training.sampling import run_schedule

    if "text-row:import" in faults:
        raise ImportError("injected fault 'text-row:import': No module named 'diffusers'")
    from diffusers import SD3Transformer2DModel

    from flowturbo.training.families.flow_match import PipelineFolder, quiet_diffusers
    from flowturbo.training.families.fused_adaln import fuse_adaln
    from flowturbo.training.families.sd3 import SD3Family

    faults.fire("text-row")
    config, shapes = (DRY, DRY_SHAPES) if dry else (SD35_MEDIUM, GPU_SHAPES)
    dtype = torch.float32 if dry else torch.bfloat16
    folder = write_config_folder(workdir / "sd3_configs", config)
    family = SD3Family(PipelineFolder.read(folder))

    started = time.perf_counter()
    torch.manual_seed(SEED)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config)
    with quiet_diffusers():  # its note on casting with to(): this model keeps no module in float32
        transformer = transformer.to(dtype).eval().requires_grad_(False)
    _sync(device)
    build_s = time.perf_counter() - started
    family.transformer = transformer  # the adapter without attach(): no pipeline, no VAE (module docstring)
    params = sum(p.numel() for p in transformer.parameters())

    size = ImageSize(shapes["image"], shapes["image"])
    latent_shape = family.latent_shape(size)  # (16, H/8, W/8)
    cfg = family.defaults.cfg
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    noise = torch.randn((1, *latent_shape), generator=generator).to(device)  # float32 state, as the sampler's
    embeds = [torch.randn((1, shapes["tokens"], shapes["width"]), generator=generator).to(device, dtype)
              for _ in range(2)]
    pooled = [torch.randn((1, shapes["pooled"]), generator=generator).to(device, dtype) for _ in range(2)]
    conditioning = TextConditioning(PromptEmbeddings(embeds[0], pooled[0]), PromptEmbeddings(embeds[1], pooled[1]))

    def schedule_for(spec: str) -> Any:
        schedule = SamplingSchedule.parse(spec, guidance_scale=cfg)
        family.check_schedule(schedule)
        return dataclasses.replace(schedule, timesteps=family.timesteps(schedule.num_steps, latent_shape))

    schedules = {spec: schedule_for(spec) for spec in SCHEDULES}
    image_tokens = family.image_tokens(latent_shape)
    rec.set("text_row", {
        "row": TITLE, "model": "SD3.5-medium-shaped, random weights" if not dry else "tiny SD3-shaped (dry run)",
        "transformer_config": config, "parameters": params, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "image": f"{size.width}x{size.height}", "latent_shape": list(latent_shape),
        "image_tokens": image_tokens, "text_tokens": shapes["tokens"], "cfg": cfg, "batch": 1,
        "transformer_batch": 2, "build_s": build_s, "warmup": warmup, "replays": replays,
        "path": "SD3Family (configs-only folder, random transformer) -> run_schedule (integrator), reference solver "
                "ops, eager, no CUDA graph, no text encoders, no decode"})
    rec.log(f"row t: SD3 transformer with {params / 1e6:.3f} M parameters built in {build_s:.1f} s "
            f"({image_tokens} image tokens + {shapes['tokens']} text tokens, CFG batch 2)")

    def runner(schedule: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return run_schedule(schedule, noise, family.model_calls(conditioning, schedule), check_finite=False)
        return run

    baseline: dict[str, Any] = {}

    def measure(key: str, spec: str, note: str) -> None:
        schedule = schedules[spec]
        run = runner(schedule)
        _sync(device)
        t0 = time.perf_counter()
        result = run()  # the first call of this configuration (cuBLAS / attention kernels picked, Triton compiled)
        _sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(warmup):
            run()
        times, result = time_calls(run, replays, device)
        latents = result.latents.float()
        ms = statistics.median(times)
        calls = int(result.predictor_calls)
        entry = {"row": TITLE, "schedule": spec, "order": len(baseline), "batch": 1, "calls": calls, "ms_per_image": ms,
                 "ms_per_call": ms / calls, "ms_runs": times, "first_call_s": first_s, "note": note,
                 "latents_finite": bool(torch.isfinite(latents).all()), "latents_max_abs": float(latents.abs().max())}
        if "E28" in baseline and key != "E28":
            entry["speedup_vs_E28"] = baseline["E28"]["ms_per_image"] / ms
        if key.endswith("+adaln") and spec in baseline:
            entry["speedup_vs_unfused"] = baseline[spec]["ms_per_image"] / ms
            entry["max_abs_diff_vs_unfused"] = float((latents - baseline[spec]["latents"]).abs().max())
        baseline[key] = {"ms_per_image": ms, "latents": latents}
        rec.update("text_rows", **{f"t:{key}": entry})
        rec.log(f"row t {key}: {ms:.2f} ms/img ({calls} calls, {ms / calls:.2f} ms/call)")

    fuse_adaln(transformer, "reference")  # diffusers' own modules exactly
    for spec in SCHEDULES:
        measure(spec, spec, "diffusers modules, reference solver ops, eager")
    why = caps.why_not("triton")
    if why is not None:
        rec.skip("row:t:adaln", why)
        return
    fusion = fuse_adaln(transformer, "triton")
    rec.update("text_row", adaln_fusion=fusion.to_dict())
    measure(f"{FUSED_SCHEDULE}+adaln", FUSED_SCHEDULE,
            f"fused adaLN (triton) in {sum(fusion.fused.values())} modules, reference solver ops, eager")
    fuse_adaln(transformer, "reference")


__all__ = ["DRY", "GPU_SHAPES", "ROW", "SCHEDULES", "SD35_MEDIUM", "run_text_row", "write_config_folder"]
