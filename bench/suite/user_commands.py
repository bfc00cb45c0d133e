"""What the README tells a GPU user to run, run as commands (not through the API) on the suite's models.

From the suite's random-weight predictor / refiner (saved as official-layout ``.pt`` checkpoints) and its
``AutoencoderKL`` (saved as a diffusers folder): ``flowturbo train package`` (a bundle), then on that bundle
``flowturbo sample``, ``flowturbo profile`` (its per-step table must add up to the total), ``flowturbo inpaint``
and ``flowturbo edit`` — each recorded with its exit status, seconds, the ``execution:`` line it printed and
the tail of its output (in ``suite.log``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.faults import Faults
from suite.preflight import Capabilities
from suite.record import Recorder
from suite.rows import CFG, GUIDANCE_CHANNELS, SCHEDULE_SPEC, SuiteModels

COMMANDS = ("package", "sample", "profile", "inpaint", "edit")


def _write_inputs(folder: Path, size: int) -> tuple[Path, Path]:
    """A smooth RGB test image and a centre mask (white = regenerate) of the model's image size."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * x * y)], axis=-1)
    image, mask = folder / "input.png", folder / "mask.png"
    Image.fromarray((255 * rgb).astype(np.uint8), "RGB").save(image)
    m = np.zeros((size, size), np.uint8)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    Image.fromarray(m, "L").save(mask)
    return image, mask


def prepare(models: SuiteModels, folder: Path) -> dict[str, Path]:
    """Official-layout checkpoints and the VAE folder the commands start from."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"predictor": folder / "SiT-random.pt", "refiner": folder / "refiner-random.pt", "vae": folder / "vae"}
    torch.save({k: v.detach().cpu() for k, v in models.predictor.state_dict().items()}, paths["predictor"])
    torch.save({k: v.detach().cpu() for k, v in models.refiner.state_dict().items()}, paths["refiner"])
    models.vae.save_pretrained(paths["vae"])
    size = models.config.input_size * models.decoder.downsample_factor
    paths["image"], paths["mask"] = _write_inputs(folder, size)
    paths["bundle"], paths["outputs"] = folder / "bundle", folder / "outputs"
    return paths


def command_lines(paths: dict[str, Path], device: str, batch: int, num_classes: int) -> dict[str, list[str]]:
    """The ``flowturbo`` argument lists, as a user would type them."""
    bundle, out = str(paths["bundle"]), paths["outputs"]
    classes = ",".join(str((7 * k + 3) % num_classes) for k in range(batch))
    return {
        "package": ["train", "package", "--predictor", str(paths["predictor"]), "--refiner", str(paths["refiner"]),
                    "--vae", str(paths["vae"]), "--schedule", SCHEDULE_SPEC, "--cfg", str(CFG),
                    "--guidance-channels", str(GUIDANCE_CHANNELS), "--out", bundle, "--overwrite"],
        "sample": ["sample", "--model", bundle, "--device", device, "--classes", classes, "--num-images", str(batch),
                   "--out", str(out / "sample"), "--no-progress"],
        "profile": ["profile", "--model", bundle, "--device", device, "--batch", str(batch), "--warmup", "1",
                    "--repeats", "3", "--out", str(out / "profile")],
        "inpaint": ["inpaint", "--model", bundle, "--device", device, "--image", str(paths["image"]), "--mask",
                    str(paths["mask"]), "--classes", classes.split(",")[0], "--num-images", "2",
                    "--out", str(out / "inpaint"), "--no-progress"],
        "edit": ["edit", "--model", bundle, "--device", device, "--image", str(paths["image"]), "--strength", "0.6",
                 "--classes", classes.split(",")[0], "--out", str(out / "edit"), "--no-progress"],
    }


def _check_outputs(name: str, out: Path) -> dict[str, Any]:
    """What each command must have written; the profile's per-step table must add up to its total."""
    if name == "package":
        return {"bundle_config": (out / "config.json").is_file()}
    if name == "profile":
        data = json.loads((out / "profile.json").read_text())
        consistency = data["consistency"]
        if not consistency["within_tolerance"]:
            raise RuntimeError(f"the per-step table does not add up to the total: {consistency}")
        return {"total_ms": data["total_ms"], "steps_plus_decode_ms": consistency["steps_plus_decode_ms"],
                "relative_difference": consistency["relative_difference"],
                "summary": f"steps + decode {consistency['steps_plus_decode_ms']:.1f} ms vs total "
                           f"{data['total_ms']:.1f} ms ({100 * consistency['relative_difference']:+.1f}%)"}
    run = json.loads((out / "run.json").read_text())
    return {"run_json_execution": run.get("execution")}


def run_commands(rec: Recorder, models: SuiteModels, device: Any, batch: int, folder: Path, caps: Capabilities,
                 faults: Faults, fits: Callable[[str, float], bool], estimate_s: float, timeout_s: float,
                 env: dict[str, str], only: set[str] | None = None) -> None:
    """Run the user commands in order (``only``: a subset, e.g. what an earlier phase skipped for time); each is
    recorded as task ``user:<name>``. The others need the bundle ``package`` makes (made again when missing)."""
    reason = caps.why_not("diffusers")
    if reason is not None:
        for name in COMMANDS:
            rec.task(f"user:{name}", "skipped", reason=reason)
        return
    if not fits("user:prepare", 2 * estimate_s):
        return
    started = time.perf_counter()
    paths = prepare(models, folder)  # the same weights in every phase (seeded), so an earlier bundle is reused
    rec.log(f"user commands: checkpoints and VAE folder written in {time.perf_counter() - started:.1f} s")
    lines = command_lines(paths, device.type, batch, models.config.num_classes)
    outputs = {"package": paths["bundle"], **{n: paths["outputs"] / n for n in COMMANDS if n != "package"}}
    wanted = [n for n in COMMANDS if only is None or n in only or (n == "package" and not paths["bundle"].is_dir())]
    for name in wanted:
        task = f"user:{name}"
        if name != "package" and not (paths["bundle"] / "config.json").is_file():
            rec.task(task, "skipped", reason="`flowturbo train package` did not make the bundle")
            continue
        if not fits(task, estimate_s):
            continue
        argv = ["flowturbo", *lines[name]]
        if f"user:{name}" in faults:
            argv.append("--no-such-flag-injected-fault")  # a failing command, as a typo on the device would be
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "flowturbo", *argv[1:]], capture_output=True, text=True,
                                  timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rec.append_log(" ".join(argv), output)
            rec.task(task, "timeout", command=" ".join(argv), seconds=time.perf_counter() - started)
            rec.error(task, f"timed out after {timeout_s:.0f} s")
            continue
        seconds = time.perf_counter() - started
        output = proc.stdout + proc.stderr
        rec.append_log(" ".join(argv), output)
        execution = next((line.split(":", 1)[1].strip() for line in output.splitlines()
                          if line.startswith("execution:")), None)
        details: dict[str, Any] = {"command": " ".join(argv), "returncode": proc.returncode, "seconds": seconds,
                                   "execution": execution, "tail": output.strip().splitlines()[-3:],
                                   "summary": f"{seconds:.1f} s" + (f", execution: {execution}" if execution else "")}
        if proc.returncode != 0:
            rec.task(task, "error", **details)
            rec.error(task, f"exit {proc.returncode}: {(output.strip().splitlines() or [''])[-1]}")
            continue
        try:
            details.update(_check_outputs(name, outputs[name]))
        except Exception as exc:  # noqa: BLE001 - recorded: the command ran but its output is wrong
            rec.task(task, "error", **details)
            rec.error(task, f"{type(exc).__name__}: {exc}")
            continue
        rec.task(task, "ok", **details)
        rec.log(f"user command {name}: ok in {seconds:.1f} s" + (f" (execution: {execution})" if execution else ""))


def subprocess_env(extra_path: str | None) -> dict[str, str]:
    """The environment for commands: unbuffered, and the repository on PYTHONPATH when the layers are linked."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return env


__all__ = ["COMMANDS", "command_lines", "prepare", "run_commands", "subprocess_env"]
