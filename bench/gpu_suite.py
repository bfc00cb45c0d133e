"""The one prepared GPU suite: build, correctness against the references, end-to-end timings, GPU tests.

A lent GPU machine gives ~15 minutes in all and is released after ~30 s idle, so the suite runs as **phases**,
each one device-tool command of <= 300 s (H200 estimate), issued back to back (BENCHMARKS.md has the exact
commands and the carry list)::

    python3 bench/gpu_suite.py --phase 1 --out "$OUT"   # pre-flight, build, rows a b d, the user's commands
    python3 bench/gpu_suite.py --phase 2 --out "$OUT"   # row c (torch.compile), AOTI export, rows e f
    python3 bench/gpu_suite.py --phase 3 --out "$OUT"   # what 1-2 skipped for time, GPU tests, kernel bench, row t
    python bench/gpu_suite.py --merge p1/phase1.json p2/phase2.json p3/phase3.json --out bench/results/x
    python bench/gpu_suite.py --dry-run --phase all --out /tmp/s   # the same code paths on CPU (CI)

Rows, side by side in each phase with that phase's own reference row (b), ms per image (CUDA events, median over
``--replays`` after warm-up), build/compile seconds apart, max |final latents - row (b)| and - float64 path:
(a) fp16-autocast eager, (b) bf16 eager reference, (c) ``torch.compile`` (once for every batch size) + CUDA graph,
(d) flowturbo's fast path (Triton + one CUDA graph), (e) AOTInductor packages in the C++ runner + its CUDA graph,
(f) the Python loop over the same packages. SiT-XL/2 shapes with random weights, a one-block refiner, an
SD-VAE-shaped AutoencoderKL; H1P5R3, CFG 4.0 on 3 of 4 channels; batches 1 and 8. Optional row (t), last in phase
3 (``suite/text_row.py``): text-to-image, a random SD3.5-medium-shaped diffusers transformer at 1024x1024, E28 vs H8
vs H1P5 (and H1P5 with our fused adaLN) through the SD3 family adapter and the integrator; skipped, with the wheel
to carry named, when diffusers is missing.

What makes the first run on a device count (issue 18): the record (``phase<N>.json`` + the merged
``gpu_suite.json``) is written after every row, task and check, and the short table is printed in a ``finally``
(also on SIGTERM or the suite's own watchdog); every failure — a row, a timeout of pytest, the model build, the
float64 reference, the export's own check — is recorded and skips only what depends on it; after a successful
build the suite re-executes itself so the fresh editable install imports; pre-flight checks come first; graph
rows report how they actually ran (a fallback is an error); the budget is checked before each part and each
exported module. ``--inject-fault`` rehearses all of that on a CPU (``scripts/rehearse_device.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from suite import preflight  # noqa: E402
from suite.faults import Faults, describe as describe_faults  # noqa: E402
from suite.record import (  # noqa: E402
    MERGED_FILE,
    PHASE_FILE,
    Recorder,
    atomic_write_text,
    load_phases,
    merge_phases,
    short_table,
)

CARRY = REPO / ".devcarry"  # git-ignored; filled by scripts/prepare_gpu_carry.sh
DEFAULT_STATE_DIR = Path(tempfile.gettempdir()) / "flowturbo_gpu_suite"
PHASES = ("1", "2", "3", "all")
PHASE_ROWS = {"1": "abd", "2": "bcef", "3": "t", "all": "abcdeft"}
# Seconds each phase may take (the device command's timeout_s should be ~30 s more); the dry run's is larger.
PHASE_BUDGET_S = {"1": 270.0, "2": 300.0, "3": 240.0, "all": 510.0}
DRY_BUDGET_S = 1800.0
WATCHDOG_GRACE_S = {"gpu": 20.0, "dry": 300.0}  # past the budget, the watchdog stops the phase (table kept)
# H200 estimates (seconds) of each part, from DESIGN.md's numbers and the H100 runs; a part is skipped (named,
# with the reason) when less time is left. The dry run scales them by DRY_ESTIMATE_SCALE.
ESTIMATE_S = {"build": 150.0, "models": 25.0, "row": 8.0, "row:first:c": 150.0, "row:first:d": 30.0,
              "row:first:e": 20.0, "row:first:f": 15.0, "export_module": 100.0, "user": 45.0, "tests": 150.0,
              "kernel_bench": 60.0, "preflight_runtime": 40.0,
              # row t: 2.24 B random params built on the GPU (~10-20 s) + 232 transformer calls at 1024^2 with CFG
              # (E28, H8, H1P5 and H1P5 fused, each 1 untimed + 3 timed runs) at an estimated ~0.1-0.15 s each
              "row:t": 70.0}
TEXT_ROW_REPLAYS = {"gpu": 3, "dry": 1}  # timed runs per schedule of row t, after its untimed first run
DRY_ESTIMATE_SCALE = 0.02
BUDGET_REASON = "time budget"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="fault names (--inject-fault):\n" +
                                describe_faults(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny config on CPU: the same code paths, no GPU")
    p.add_argument("--phase", choices=PHASES, default="all", help="which phase (default all: every part in one run)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench" / "results" / "gpu_suite")),
                   help="folder for the JSON record and logs (default: $OUT)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help="where phases leave their record and exports for the next phase on the same machine")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="images per batch (default 1 8; dry 2)")
    p.add_argument("--replays", type=int, default=None, help="timed runs per row (default 20; dry 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row first (default 3; dry 1)")
    p.add_argument("--rows", default="abcdeft", help="restrict the rows (default all of the phase's)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip what would not fit in this many seconds (default per phase: 1 270, 2 300, 3 240, "
                        f"all 510; dry run {DRY_BUDGET_S:.0f})")
    p.add_argument("--skip-build", action="store_true", help="flowturbo is already installed")
    p.add_argument("--skip-tests", action="store_true", help="no pytest run")
    p.add_argument("--skip-kernel-bench", action="store_true", help="no bench_kernels.py run")
    p.add_argument("--skip-user-commands", action="store_true", help="no flowturbo sample/profile/inpaint/edit run")
    p.add_argument("--inject-fault", action="append", default=[], metavar="NAME",
                   help="rehearsal only: make one part fail (repeatable; names below)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="PHASE_JSON",
                   help="merge phase records fetched from the device into OUT/gpu_suite.json and print the table")
    p.add_argument("--resumed", action="store_true", help=argparse.SUPPRESS)  # set by the re-exec after the build
    return p.parse_args(argv)


class Budget:
    """Wall-clock budget of one phase (kept across the re-exec after the build through $GPU_SUITE_STARTED)."""

    def __init__(self, seconds: float, rec: Recorder | None = None, scale: float = 1.0) -> None:
        self.start = float(os.environ.setdefault("GPU_SUITE_STARTED", repr(time.time())))
        self.seconds, self.rec, self.scale = seconds, rec, scale

    @property
    def left(self) -> float:
        return self.seconds - (time.time() - self.start)

    def fits(self, what: str, estimate_s: float) -> bool:
        """True if ``what`` (estimated ``estimate_s`` seconds on an H200) fits; else recorded as skipped."""
        need = estimate_s * self.scale
        if self.left >= need:
            return True
        if self.rec is not None:
            self.rec.skip(what, f"{BUDGET_REASON}: {max(0.0, self.left):.0f} s left of {self.seconds:.0f}, "
                                f"needs ~{need:.0f} s")
        return False


class SuiteInterrupted(BaseException):
    """SIGTERM (the device tool's timeout) or the suite's own watchdog: stop, keep the record, print the table."""


def _interrupt(signum: int, _frame: Any) -> None:
    raise SuiteInterrupted(f"signal {signal.Signals(signum).name}")


# ------------------------------------------------------------------------------------------------ build
def carried_wheels(rec: Recorder) -> None:
    """Carried wheels (e.g. diffusers) into a temporary folder on sys.path and PYTHONPATH (never .devcarry:
    what a run leaves there would travel with the next carry)."""
    wheels = sorted((CARRY / "wheels").glob("*.whl")) if (CARRY / "wheels").is_dir() else []
    if not wheels or os.environ.get("GPU_SUITE_SITE"):
        if os.environ.get("GPU_SUITE_SITE"):
            sys.path.insert(0, os.environ["GPU_SUITE_SITE"])
        return
    site = Path(tempfile.mkdtemp(prefix="gpu_suite_site_"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        rec.error("carried_wheels", f"pip install of {[w.name for w in wheels]} failed: {proc.stderr[-500:]}")
        return
    sys.path.insert(0, str(site))
    os.environ["GPU_SUITE_SITE"] = str(site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    rec.set("carried_wheels", [w.name for w in wheels])


def _imports_ok(modules: str) -> bool:
    """Whether ``modules`` import in a fresh interpreter with this process's environment. Run outside the tree: with
    the tree as its working directory, ``python -c`` would import flowturbo from it (through the layer links an
    earlier run's :func:`_link_layers` left there) while this process, whose path starts at bench/, cannot."""
    return subprocess.run([sys.executable, "-c", f"import {modules}"], capture_output=True,
                          cwd=tempfile.gettempdir()).returncode == 0


def _link_layers() -> str:
    """Without a build: make the pure-Python layers importable from this (throw-away) tree; returns the path
    to put on PYTHONPATH."""
    for layer in ("kernels", "training", "export", "runtime"):
        link = REPO / "flowturbo" / layer
        if not link.exists():
            link.symlink_to(REPO / layer)
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return str(REPO)


def build_env() -> dict[str, str]:
    """The build's environment: CMake pointed at the carried nlohmann-json / OpenSSL headers when present."""
    env = dict(os.environ)
    deb = CARRY / "deb"
    if deb.is_dir():  # headers unpacked from nlohmann-json3-dev / libssl-dev (the device image lacks them)
        crypto = next(iter(sorted(deb.glob("usr/lib/*/libcrypto.so*"))), None)
        cmake = [f"-Dnlohmann_json_DIR={deb}/usr/share/cmake/nlohmann_json", f"-DOPENSSL_INCLUDE_DIR={deb}/usr/include"]
        if crypto is not None:
            cmake.append(f"-DOPENSSL_CRYPTO_LIBRARY={crypto}")
        env["CMAKE_ARGS"] = " ".join(cmake)
        env["CPATH"] = os.pathsep.join(str(p) for p in sorted(deb.glob("usr/include/*-linux-gnu")))
    return env


def ensure_built(args: argparse.Namespace, rec: Recorder, faults: Faults, budget: Budget) -> None:
    """flowturbo importable with its C++ extensions: built here unless it already is. After a successful build
    the suite re-executes itself (an editable install's import hook is read only at interpreter start)."""
    if args.resumed:
        ok = _imports_ok("flowturbo.runtime, flowturbo.kernels")
        rec.update("build", importable_after_reexec=ok)
        if not ok:
            rec.error("build", "the build succeeded but flowturbo does not import in a fresh interpreter; "
                               "continuing with the pure-Python layers of this tree")
            rec.set("pythonpath", _link_layers())
        return
    if args.skip_build:
        rec.set("build", {"skipped": "--skip-build"})
        if not _imports_ok("flowturbo.runtime, flowturbo.kernels"):
            rec.set("pythonpath", _link_layers())
        return
    if "build" not in faults and _imports_ok("flowturbo._runner, flowturbo.runtime"):
        rec.set("build", {"skipped": "flowturbo and its C++ runner already import (an earlier phase built them)"})
        return
    if not budget.fits("build", ESTIMATE_S["build"]):
        rec.set("pythonpath", _link_layers())
        return
    started = time.perf_counter()
    rec.log("building flowturbo (pip install --no-build-isolation --no-deps -e .); log in build.log")
    if "build" in faults:
        returncode, output = 1, "injected fault 'build': the editable install failed\n"
    else:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                               str(REPO)], env=build_env(), capture_output=True, text=True)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    (rec.out / "build.log").write_text(output)
    status = next((line.split("flowturbo runner:", 1)[1].strip() for line in output.splitlines()
                   if "flowturbo runner:" in line), None)
    rec.set("build", {"returncode": returncode, "seconds": time.perf_counter() - started, "runner_status": status})
    if returncode != 0:
        rec.error("build", f"pip install -e failed (rc {returncode}); last line: "
                           f"{(output.strip().splitlines() or [''])[-1]}; the pure-Python layers go on")
        rec.set("pythonpath", _link_layers())
        return
    rec.log("build done; re-executing the suite so the new install is imported")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--resumed"])


# ------------------------------------------------------------------------------------------------ phases
@dataclasses.dataclass
class Phase:
    """Everything the parts of a phase share."""

    args: argparse.Namespace
    rec: Recorder
    budget: Budget
    faults: Faults
    caps: preflight.Capabilities
    device: Any = None
    models: Any = None
    bench: Any = None
    export_path: Path | None = None
    export_s: float = 0.0
    no_models: str | None = None  # why the models are unavailable (a failed build, or the time budget)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    @property
    def work(self) -> Path:
        return self.args.state_dir / "work"

    def estimate(self, key: str) -> float:
        return ESTIMATE_S[key]

    def row_estimate(self, key: str, batch: int) -> float:
        measured = any(k.startswith(f"{key}@") for k in self.rec.results["rows"])
        return ESTIMATE_S["row"] if measured else ESTIMATE_S.get(f"row:first:{key}", ESTIMATE_S["row"])


def _schedule() -> Any:
    from flowturbo.schedule import SamplingSchedule
    from suite.rows import CFG, GUIDANCE_CHANNELS, SCHEDULE_SPEC

    return SamplingSchedule.parse(SCHEDULE_SPEC, guidance_scale=CFG, guidance_channels=GUIDANCE_CHANNELS)


def ensure_bench(ph: Phase) -> bool:
    """The models, the shared inputs and the float64 reference (once per process); False when they are not
    available (``ph.no_models`` says why)."""
    if ph.bench is not None:
        return True
    if ph.no_models is not None:
        return False
    if not ph.budget.fits("models", ESTIMATE_S["models"]):
        ph.no_models = f"no models ({BUDGET_REASON})"
        return False
    from suite.rows import Bench, build_models

    args = ph.args
    batches = args.batches or ([2] if ph.dry else [1, 8])
    replays = args.replays or (1 if ph.dry else 20)
    warmup = args.warmup if args.warmup is not None else (1 if ph.dry else 3)
    schedule = _schedule()
    ph.rec.set("config", {"schedule": schedule.describe(), "batches": batches, "replays": replays, "warmup": warmup,
                          "device": str(ph.device), "model": "tiny (dry run)" if ph.dry else "SiT-XL/2 random weights"})
    started = time.perf_counter()
    try:
        ph.models = build_models(ph.dry, ph.device, ph.caps, ph.faults)
    except Exception as exc:  # noqa: BLE001 - recorded; every row is skipped, the record still comes out
        ph.no_models = "the model build failed (see errors)"
        ph.rec.error("models", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        return False
    ph.rec.set("models", {"seconds": time.perf_counter() - started, "decoder": ph.models.decoder_kind})
    ph.bench = Bench(ph.rec, ph.models, ph.device, schedule, batches, warmup, replays, ph.faults, ph.budget.fits)
    return True


def run_rows(ph: Phase, keys: str) -> None:
    """Rows ``keys`` (within ``--rows``): the PyTorch ones first, then the exported ones (export first)."""
    keys = "".join(k for k in keys if k in ph.args.rows)
    if not keys:
        return
    if not ensure_bench(ph):
        for key in keys:
            ph.rec.skip(f"row:{key}", ph.no_models or "no models")
        return
    from suite.rows import torch_rows

    skip = lambda key, reason: ph.rec.skip(f"row:{key}", reason)  # noqa: E731
    torch_keys = "".join(k for k in keys if k in "abcd")
    if torch_keys:
        if "b" not in torch_keys and not ph.bench.references:
            torch_keys = "b" + torch_keys  # every phase measures its own baseline (b)
        try:
            rows = torch_rows(ph.models, ph.dry, ph.device, ph.bench.schedule, torch_keys, ph.caps, ph.faults, skip)
            ph.bench.measure(rows, ph.row_estimate)
        except Exception as exc:  # noqa: BLE001 - the exported rows still get their chance
            ph.rec.error("rows:torch", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            rows = None
            _free_memory(ph)
    aoti_keys = "".join(k for k in keys if k in "ef")
    if aoti_keys:
        if not ph.bench.references and "b" in ph.args.rows:
            run_rows(ph, "b")
        if ensure_export(ph):
            from suite.rows import aoti_rows

            try:
                rows = aoti_rows(ph.export_path, ph.device, aoti_keys, ph.caps, skip, ph.export_s)
                ph.bench.measure(rows, ph.row_estimate)
            except Exception as exc:  # noqa: BLE001
                ph.rec.error("rows:aoti", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            for key in aoti_keys:
                ph.rec.skip(f"row:{key}", "no export (see the export task)")


def _free_memory(ph: Phase) -> None:
    import gc

    gc.collect()
    if ph.device is not None and ph.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


class BudgetExceeded(RuntimeError):
    """Raised before an exported module that would not fit the budget."""


def ensure_export(ph: Phase) -> bool:
    """The AOTInductor packages (reused from the state folder when an earlier phase built the same ones)."""
    if ph.export_path is not None:
        return True
    reason = ph.caps.why_not("aoti")
    if reason is not None:
        ph.rec.task("export", "skipped", reason=reason)
        return False
    from suite.rows import export_packages

    def before_module(stem: str, index: int, count: int) -> None:
        if not ph.budget.fits(f"export:{stem}", ESTIMATE_S["export_module"]):
            raise BudgetExceeded(f"{stem} ({index + 1}/{count}) would not fit the time budget")
        ph.rec.log(f"export: building {stem} ({index + 1}/{count})")

    from suite.rows import export_kernels

    first = export_kernels(ph.dry, ph.caps)
    # Our Triton kernels inside AOTInductor CUDA packages have never been built on a GPU: if that export fails,
    # the reference kernels' packages still give rows e and f (the failure stays in the record).
    for kernels in dict.fromkeys((first, "reference")):
        started = time.perf_counter()
        try:
            ph.export_path = export_packages(ph.models, ph.dry, ph.device, ph.bench.schedule, ph.bench.batches,
                                             ph.work, kernels, ph.faults, before_module, ph.rec)
        except BudgetExceeded as exc:
            ph.rec.task("export", "skipped", reason=f"{BUDGET_REASON}: {exc}")
            ph.rec.skip("export", f"{BUDGET_REASON}: {exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - recorded; rows e, f are skipped (or use the next kernels)
            ph.rec.task("export", "error", reason=f"{type(exc).__name__}: {exc}", kernels=kernels)
            ph.rec.error(f"export:{kernels}", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            continue
        finally:
            _free_memory(ph)
        ph.export_s = time.perf_counter() - started
        ph.rec.task("export", "ok", seconds=ph.export_s, path=str(ph.export_path), kernels=kernels)
        return True
    return False


def run_user_commands(ph: Phase, only: set[str] | None = None) -> None:
    if ph.args.skip_user_commands:
        ph.rec.skip("user_commands", "--skip-user-commands")
        return
    if not ensure_bench(ph):
        ph.rec.skip("user_commands", ph.no_models or "no models")
        return
    from suite.user_commands import run_commands, subprocess_env

    env = subprocess_env(ph.rec.results.get("pythonpath"))
    batch = max(ph.bench.batches)
    try:
        run_commands(ph.rec, ph.models, ph.device, batch, ph.work / "user", ph.caps, ph.faults, ph.budget.fits,
                     ESTIMATE_S["user"], timeout_s=max(30.0, min(240.0, ph.budget.left - 10)), env=env, only=only)
    except Exception as exc:  # noqa: BLE001
        ph.rec.error("user_commands", f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _subprocess(ph: Phase, name: str, command: list[str], timeout_s: float, log_name: str | None) -> None:
    """Run ``command``; a timeout or a failure is recorded as task ``name``, never raised."""
    started = time.perf_counter()
    display = " ".join(command[1:] if command[0] == sys.executable else command)
    env = dict(os.environ)
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        if log_name:
            (ph.rec.out / log_name).write_text(output)
        else:
            ph.rec.append_log(display, output)
        ph.rec.task(name, "timeout", command=display, seconds=time.perf_counter() - started,
                    summary=f"timed out after {timeout_s:.0f} s")
        ph.rec.error(name, f"timed out after {timeout_s:.0f} s (partial output kept)")
        return
    output = proc.stdout + proc.stderr
    if log_name:
        (ph.rec.out / log_name).write_text(output)
    else:
        ph.rec.append_log(display, output)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    status = "ok" if proc.returncode == 0 else "error"
    ph.rec.task(name, status, command=display, returncode=proc.returncode, seconds=time.perf_counter() - started,
                summary=summary)
    if status != "ok":
        ph.rec.error(name, f"exit {proc.returncode}: {summary}")
    ph.rec.log(f"{name}: {summary}")


def run_tests(ph: Phase) -> None:
    if ph.args.skip_tests:
        ph.rec.skip("tests", "--skip-tests")
        return
    if not ph.budget.fits("tests", ESTIMATE_S["tests"]):
        return
    if ph.dry:  # fast, CPU-safe subset
        selection = ["tests/runtime/test_fast_path.py", "-k", "cuda_only or graph_cache or single_threaded"]
    else:
        selection = ["tests/kernels", "tests/runtime/test_fast_path.py", "tests/runtime/test_cpp_runner.py",
                     "tests/training/test_models.py", "-m", "gpu or not slow"]
    timeout_s = 1.0 if "tests-timeout" in ph.faults else max(30.0, ph.budget.left - 20)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout",
               str(int(max(60, ph.budget.left - 30))), *selection]
    _subprocess(ph, "tests", command, timeout_s, "gpu_tests.log")


def run_kernel_bench(ph: Phase) -> None:
    if ph.args.skip_kernel_bench:
        ph.rec.skip("kernel_bench", "--skip-kernel-bench")
        return
    if not ph.budget.fits("kernel_bench", ESTIMATE_S["kernel_bench"]):
        return
    # On the GPU with the torch.compile (Inductor) variants: the solver kernels' target is "<= Inductor".
    command = [sys.executable, str(REPO / "bench" / "bench_kernels.py"), "--out", str(ph.rec.out / "kernels.json"),
               "--skip-model"] + (["--dry-run", "--no-compile"] if ph.dry else [])
    timeout_s = 1.0 if "kernel-bench-timeout" in ph.faults else max(30.0, ph.budget.left - 10)
    _subprocess(ph, "kernel_bench", command, timeout_s, None)


def run_text_row(ph: Phase) -> None:
    """Row (t), the optional text-to-image row (``suite/text_row.py``): last, as time allows."""
    if "t" not in ph.args.rows:
        return
    from suite.text_row import run_text_row as run

    run(ph.rec, ph.dry, ph.device, ph.caps, ph.faults, ph.work, ph.budget.fits, ESTIMATE_S["row:t"], warmup=0,
        replays=TEXT_ROW_REPLAYS["dry" if ph.dry else "gpu"])


def leftovers(state_dir: Path, phase: str) -> tuple[set[str], set[str]]:
    """Rows ("c@8") and tasks ("export", "user:edit") that earlier phases of this machine skipped for time."""
    rows: set[str] = set()
    tasks: set[str] = set()
    for record in load_phases(sorted(state_dir.glob(PHASE_FILE.format("*")))):
        if str(record.get("phase")) >= phase:
            continue
        for what, reason in record.get("skipped", {}).items():
            if BUDGET_REASON not in str(reason):
                continue
            if what.startswith("row:") or "@" in what:
                rows.add(what.removeprefix("row:"))
            else:
                tasks.add(what)
    return rows, tasks


def run_phase(ph: Phase) -> None:
    """The parts of ``--phase`` in order (see the module docstring)."""
    args, rec = ph.args, ph.rec
    carried_wheels(rec)
    if not args.resumed:
        preflight.toolchain(rec, ph.faults, ph.caps, ph.dry)
        rec.set("capabilities", dataclasses.asdict(ph.caps))
    else:
        ph.caps = preflight.Capabilities(**rec.results["capabilities"])
    ensure_built(args, rec, ph.faults, ph.budget)  # may re-execute this script
    import torch

    rec.set("environment", environment(torch))
    if not ph.dry and not torch.cuda.is_available():
        rec.error("device", "no CUDA device here; use --dry-run on a CPU machine")
        return
    ph.device = torch.device("cuda" if not ph.dry else "cpu")
    ph.caps.cuda = ph.device.type == "cuda"
    if ph.budget.fits("preflight_runtime", ESTIMATE_S["preflight_runtime"]):
        preflight.runtime(rec, ph.faults, ph.caps, ph.device, ph.dry, aoti=args.phase in ("1", "all"))
    phase = args.phase
    if phase in ("1", "all"):
        run_rows(ph, "abd")
        run_user_commands(ph)
    if phase in ("2", "all"):
        run_rows(ph, "bcef" if phase == "2" else "cef")
    if phase == "3":
        rows, tasks = leftovers(args.state_dir, phase)
        rec.set("leftovers", {"rows": sorted(rows), "tasks": sorted(tasks)})
        keys = "".join(sorted({r.split("@")[0] for r in rows} | ({"e", "f"} if "export" in tasks else set())))
        if keys:
            run_rows(ph, keys)
        users = {t.removeprefix("user:") for t in tasks if t.startswith("user:")} | (
            {"package", "sample", "profile", "inpaint", "edit"} if "user:prepare" in tasks else set())
        if users:
            run_user_commands(ph, only=users)
    if phase in ("3", "all"):
        run_tests(ph)
        run_kernel_bench(ph)
        run_text_row(ph)


def environment(torch: Any) -> dict[str, Any]:
    commit_file = CARRY / "commit.txt"
    from bench_common import git_commit

    commit = git_commit()
    if commit == "unknown" and commit_file.is_file():
        commit = commit_file.read_text().strip() + " (from .devcarry/commit.txt)"
    env = {"commit": commit, "torch": torch.__version__, "python": platform.python_version(),
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


# ------------------------------------------------------------------------------------------------ main
def merge_files(files: list[Path], out: Path) -> int:
    merged = merge_phases(load_phases(files))
    atomic_write_text(out / MERGED_FILE, json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")
    print(short_table(merged))
    print(f"wrote {out / MERGED_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_files(args.merge, args.out)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    faults = Faults(args.inject_fault)
    if not args.resumed:  # the phase's clock starts now; the re-exec after the build keeps it
        os.environ["GPU_SUITE_STARTED"] = repr(time.time())
    if args.phase in ("1", "all") and not args.resumed and args.state_dir.is_dir():
        for stale in args.state_dir.glob(PHASE_FILE.format("*")):  # a new run starts: earlier runs' records go
            stale.unlink()
    header = {"suite": "bench/gpu_suite.py", "dry_run": args.dry_run, "argv": sys.argv[1:],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "faults": sorted(faults.names)}
    rec = (Recorder.resume(args.out, args.phase, args.state_dir) if args.resumed
           else Recorder(args.out, args.phase, args.state_dir, header))
    seconds = args.budget_s if args.budget_s is not None else (
        DRY_BUDGET_S if args.dry_run else PHASE_BUDGET_S[args.phase])
    budget = Budget(seconds, rec, DRY_ESTIMATE_SCALE if args.dry_run else 1.0)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    grace = WATCHDOG_GRACE_S["dry" if args.dry_run else "gpu"]
    signal.alarm(max(1, int(budget.left + grace)))  # the suite's own watchdog, under the device command's timeout
    ph = Phase(args, rec, budget, faults, preflight.Capabilities())
    try:
        run_phase(ph)
    except (Exception, SuiteInterrupted) as exc:  # noqa: BLE001 - whatever happens, the record and table come out
        rec.error("suite", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        signal.alarm(0)
        rec.set("seconds", time.time() - budget.start)
        merged = json.loads((args.out / MERGED_FILE).read_text())
        print(short_table(merged), flush=True)
    failed = bool(rec.results.get("errors"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
