"""Pre-flight checks of the GPU suite: each one JSON entry; a failed check skips only what depends on it.

Two groups:

* :func:`toolchain` (before the build; flowturbo need not import): nvcc and the CUDA headers/libraries the
  C++ runner's CUDA build needs, the build tools, ``from diffusers import AutoencoderKL`` (on the image it
  imports transformers and accelerate), torch, the GPU and its free memory.
* :func:`runtime` (after the build): one launch of our Triton kernels against their references, one 16-step
  CUDA-graph capture and replay of a tiny model against eager, one tiny AOTInductor compile + load with
  ``run_single_threaded`` (captured into a CUDA graph and replayed on a GPU).

The results feed :class:`Capabilities`, which the rows consult.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.faults import Faults
from suite.record import Recorder

REPO = Path(__file__).resolve().parents[2]
RUNTIME_HEADERS = ("cuda_runtime_api.h",)  # what the runner's CUDA build includes (CMakeLists.txt)
# What ATen/cuda/CUDAContext.h would pull in; the runner avoids it since issue 18 (informational only).
LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")


@dataclasses.dataclass
class Capabilities:
    """What the checks found usable; a False entry skips the parts that need it (with the reason)."""

    cuda: bool = False
    diffusers: bool = True
    triton: bool = True
    graph: bool = True
    aoti: bool = True
    runner: bool = True
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)

    def disable(self, what: str, reason: str) -> None:
        setattr(self, what, False)
        self.reasons[what] = reason

    def why_not(self, *needs: str) -> str | None:
        """The reason the first missing capability in ``needs`` is missing, or None when all are there."""
        for need in needs:
            if not getattr(self, need):
                return f"needs {need}: {self.reasons.get(need, 'unavailable')}"
        return None


def _check(rec: Recorder, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one check, record ``{"ok": True, ...}`` or the error; return its details (None when it failed)."""
    started = time.perf_counter()
    try:
        details = fn()
    except Exception as exc:  # noqa: BLE001 - a failed check is a result, never fatal to the suite
        message = f"{type(exc).__name__}: {exc}"
        rec.update("preflight", **{name: {"ok": False, "error": message, "seconds": time.perf_counter() - started}})
        rec.error(f"preflight:{name}", message, traceback.format_exc())
        return None
    rec.update("preflight", **{name: {"ok": True, "seconds": time.perf_counter() - started, **details}})
    return details


# -------------------------------------------------------------------------------------------- toolchain
def _keep_layer_folders_from_shadowing() -> None:
    """What ``import flowturbo`` does first, before flowturbo may import (pre-build): the tree's ``kernels/`` must not
    answer transformers' ``import kernels`` when the PyPI package is installed (a venv whose path lists the tree
    before site-packages failed ``from diffusers import AutoencoderKL`` so)."""
    spec = importlib.util.spec_from_file_location("_flowturbo_source_tree", REPO / "flowturbo" / "_source_tree.py")
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()


def _cuda_candidates() -> list[str]:
    spec = importlib.util.spec_from_file_location("_torch_build_info", REPO / "scripts" / "torch_build_info.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    import torch

    return module.cuda_candidates(Path(torch.__file__).resolve().parent.parent)


def _find_in(roots: list[str], name: str, subdirs: tuple[str, ...]) -> str | None:
    for root in roots:
        for sub in subdirs:
            hits = sorted(Path(root, sub).glob(name)) if any(c in name for c in "*?") else [Path(root, sub, name)]
            for hit in hits:
                if hit.exists():
                    return str(hit)
    return None


def cuda_toolkit_report() -> dict[str, Any]:
    """nvcc, the runtime header and libcudart the runner's CUDA build needs, and the optional library headers."""
    import torch

    roots = _cuda_candidates()
    include = ("include", "targets/x86_64-linux/include")
    lib = ("lib64", "lib", "targets/x86_64-linux/lib")
    report: dict[str, Any] = {"torch_cuda": torch.version.cuda, "searched": roots}
    nvcc = shutil.which("nvcc")
    report["nvcc"] = nvcc
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        report["nvcc_version"] = out.splitlines()[-1] if out else ""
    report["headers"] = {h: _find_in(roots, h, include) for h in (*RUNTIME_HEADERS, *LIBRARY_HEADERS)}
    report["libcudart"] = _find_in(roots, "libcudart.so*", lib)
    missing = [h for h in RUNTIME_HEADERS if report["headers"][h] is None]
    if report["libcudart"] is None:
        missing.append("libcudart")
    report["runner_cuda_build_possible"] = not missing
    report["missing_for_runner_cuda"] = missing
    report["missing_optional"] = [h for h in LIBRARY_HEADERS if report["headers"][h] is None]
    return report


def build_tools_report() -> dict[str, Any]:
    """cmake / ninja / pybind11 / scikit-build-core and the nlohmann-json + OpenSSL headers (system or carried)."""
    carried = REPO / ".devcarry" / "deb" / "usr" / "include"
    modules = {m: importlib.util.find_spec(m) is not None for m in ("pybind11", "scikit_build_core", "cmake", "ninja")}
    headers = {}
    for header in ("nlohmann/json.hpp", "openssl/sha.h"):
        where = [p for p in (Path("/usr/include") / header, carried / header) if p.exists()]
        headers[header] = str(where[0]) if where else None
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    headers["Python.h"] = str(python_h) if python_h.is_file() else None
    missing = [m for m, ok in modules.items() if not ok and m in ("pybind11", "scikit_build_core")]
    missing += [h for h, p in headers.items() if p is None]
    if shutil.which("cmake") is None and not modules["cmake"]:
        missing.append("cmake")
    if missing:
        raise RuntimeError(f"the C++ build will fail: missing {missing} (carry .devcarry: "
                           "bash scripts/prepare_gpu_carry.sh)")
    return {"modules": modules, "headers": headers, "cmake": shutil.which("cmake")}


def toolchain(rec: Recorder, faults: Faults, caps: Capabilities, dry: bool) -> None:
    """The checks that need no flowturbo (before the build)."""
    import torch

    def gpu() -> dict[str, Any]:
        info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            info.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                        free_gib=round(free / 2**30, 2), total_gib=round(total / 2**30, 2))
        return info

    details = _check(rec, "gpu", gpu)
    caps.cuda = bool(details and details["cuda_available"]) and not dry
    toolkit = _check(rec, "cuda_toolkit", cuda_toolkit_report)
    if toolkit is not None and not toolkit["runner_cuda_build_possible"] and caps.cuda:
        rec.log(f"the C++ runner will build without CUDA: missing {toolkit['missing_for_runner_cuda']}")
    _check(rec, "build_tools", build_tools_report)

    def diffusers() -> dict[str, Any]:
        faults.fire("preflight:diffusers")
        started = time.perf_counter()
        _keep_layer_folders_from_shadowing()
        from diffusers import AutoencoderKL  # noqa: F401 - imports transformers / accelerate where present
        import diffusers as module

        return {"version": module.__version__, "import_s": time.perf_counter() - started,
                "transformers": importlib.util.find_spec("transformers") is not None,
                "accelerate": importlib.util.find_spec("accelerate") is not None}

    if _check(rec, "diffusers", diffusers) is None:
        caps.disable("diffusers", "`from diffusers import AutoencoderKL` failed (see errors)")


# ---------------------------------------------------------------------------------------------- runtime
def _tiny_models(device: Any) -> tuple[Any, Any, Any, Any]:
    import torch

    from flowturbo.training.decoders import IdentityDecoder
    from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner, perturb_zero_initialized

    config = SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                       num_classes=10, class_dropout_prob=0.1, learn_sigma=False)
    generator = torch.Generator().manual_seed(7)
    predictor, refiner = SiT(config), VelocityRefiner(RefinerConfig.for_predictor(config))
    for model in (predictor, refiner):
        model.initialize_weights(generator)
        perturb_zero_initialized(model, generator=generator)
    return config, predictor.to(device).eval(), refiner.to(device).eval(), IdentityDecoder(config.in_channels).to(device)


def graph_check(device: Any, dry: bool, faults: Faults) -> dict[str, Any]:
    """A 16-step schedule of a tiny model through the Sampler's CUDA-graph path, replayed, against eager."""
    import torch

    from flowturbo.families import ClassConditioning  # the sampler's batches take the family's conditioning
    from flowturbo.runtime.cuda_graphs import ReplayByCallBackend
    from flowturbo.runtime.pytorch_backend import TorchPipeline, make_noise
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.schedule import SamplingSchedule
    from flowturbo.training.bundle import BundleDefaults

    faults.fire("preflight:graph")
    config, predictor, refiner, decoder = _tiny_models(device)
    schedule = SamplingSchedule.parse("H4P9R3", guidance_scale=2.0)  # 16 steps, every step kind
    pipe = TorchPipeline(predictor, refiner, decoder, config.num_classes, (4, 8, 8), None,
                         BundleDefaults(schedule="H4P9R3", cfg=2.0), "pre-flight tiny model", device,
                         torch.float32, predictor.kernel_backend)
    graphed = Sampler(pipe, cuda_graph=True, graph_backend=ReplayByCallBackend() if dry else None)
    eager = Sampler(pipe, cuda_graph=False)
    noise = make_noise(3, (4, 8, 8), 5, dtype=torch.float32, device=device)
    labels = torch.tensor([1, 4, 7], device=device)
    with torch.inference_mode():
        want = eager._forward(schedule, noise, ClassConditioning(labels))[1]
        runs = [graphed.graphs.run(("pre-flight", 3), lambda a, b: graphed._forward(schedule, a, ClassConditioning(b)),
                                   (noise, labels))
                for _ in range(3)]
    if not all(run.replayed for run in runs[1:]):
        raise RuntimeError(f"the graph was not replayed: {graphed.graphs.fallback_reason}")
    diff = max(float((run.outputs[1] - want).abs().max()) for run in runs)
    if not diff <= 1e-4:
        raise RuntimeError(f"graph replay differs from eager by {diff:.3g}")
    return {"steps": schedule.num_steps, "max_abs_diff": diff, "backend": "replay-by-call (dry run)" if dry else "cuda"}


def aoti_check(device: Any, dry: bool, faults: Faults) -> dict[str, Any]:
    """Compile + package a tiny module with AOTInductor, load it with run_single_threaded=True; on a GPU also
    capture two calls into a CUDA graph and replay it (what the C++ runner does)."""
    import torch

    faults.fire("preflight:aoti")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.silu(self.linear(x)) * 2.0  # (B, 16)

    module = Tiny().to(device).eval()
    x = torch.randn(4, 16, device=device, generator=torch.Generator(device).manual_seed(3))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_aoti_") as folder:
        exported = torch.export.export(module, (x,))
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(folder) / "tiny.pt2"))
        compile_s = time.perf_counter() - started
        runner = torch._inductor.aoti_load_package(package, run_single_threaded=True)
        with torch.inference_mode():
            want = module(x)
            got = runner(x)
            details: dict[str, Any] = {"compile_s": compile_s, "max_abs_diff": float((got - want).abs().max())}
            if device.type == "cuda":
                static = x.clone()
                runner(static)  # warm-up outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = runner(runner(static))
                static.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                details["graph_max_abs_diff"] = float((out - module(module(x))).abs().max())
    if not details["max_abs_diff"] <= 1e-4 or not details.get("graph_max_abs_diff", 0.0) <= 1e-4:
        raise RuntimeError(f"the AOTInductor package disagrees with eager: {details}")
    return details


def runtime(rec: Recorder, faults: Faults, caps: Capabilities, device: Any, dry: bool, *, aoti: bool = True) -> None:
    """The checks that need flowturbo (after the build); ``aoti=False`` leaves out the AOTInductor compile (the
    phases after the first: their export is that check)."""

    def triton() -> dict[str, Any]:
        faults.fire("preflight:triton")
        from flowturbo.kernels.backend import triton_launch_failure

        failure = triton_launch_failure(device)
        if failure is not None:
            raise RuntimeError(failure)
        return {"device": str(device)}

    if _check(rec, "triton", triton) is None:
        caps.disable("triton", "the Triton probe launch failed (see errors)")
    if _check(rec, "cuda_graph", lambda: graph_check(device, dry, faults)) is None:
        caps.disable("graph", "the pre-flight CUDA-graph capture failed (see errors)")
    if aoti and _check(rec, "aoti", lambda: aoti_check(device, dry, faults)) is None:
        caps.disable("aoti", "the pre-flight AOTInductor compile/load failed (see errors)")
    try:
        import flowturbo._C as C

        status = C.runner_build_status()
        runner_ok = importlib.util.find_spec("flowturbo._runner") is not None and status.startswith("built")
    except ImportError as exc:
        status, runner_ok = f"flowturbo._C not importable ({exc})", False
    rec.update("preflight", runner={"ok": runner_ok, "status": status})
    if not runner_ok:
        caps.disable("runner", status)
    elif caps.cuda and " with CUDA" not in status:
        caps.disable("runner", f"the C++ runner was built without CUDA: {status}")
    rec.set("capabilities", dataclasses.asdict(caps))


__all__ = ["Capabilities", "aoti_check", "build_tools_report", "cuda_toolkit_report", "graph_check", "runtime",
           "toolchain"]


if __name__ == "__main__":  # quick look: python bench/suite/preflight.py
    sys.path.insert(0, str(REPO / "bench"))
    print(cuda_toolkit_report())
