"""The Sampler's fast path (Triton kernels + whole-schedule CUDA graph) on CPU, against the float64 reference.

On CPU the Triton kernels run in the interpreter and the CUDA-graph cache runs with its replay-by-call
stand-in, so everything but the real ``torch.cuda.graph`` capture is exercised here: static buffers, one
capture per (schedule, batch size), replays, the capture-failure fallback, NaN location, the out-of-memory
message. The real capture runs in the GPU-marked tests and ``bench/gpu_suite.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from micro_models import counting_graph_backend
from tolerances import tol

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.kernels import KernelBackend
from flowturbo.runtime.cuda_graphs import GraphCache, ReplayByCallBackend
from flowturbo.runtime.pytorch_backend import TorchPipeline, resolve_kernel_backend
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import BundleDefaults
from flowturbo.training.sampling import make_noise, sample_schedule

SCHEDULE = SamplingSchedule.parse("H1P2R2", guidance_scale=1.7, guidance_channels=2)  # partial guidance, R steps


def _triton_device() -> torch.device | None:
    """Where our Triton kernels run in this process: the GPU, or the CPU through Triton's interpreter
    (``TRITON_INTERPRET=1``, which conftest sets on machines without CUDA). None: neither (the interpreter is off
    on a machine without CUDA)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if os.environ.get("TRITON_INTERPRET") == "1" else None


TRITON_DEVICE = _triton_device()
requires_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None, reason="Triton kernels cannot run here: no CUDA GPU and TRITON_INTERPRET is not 1")


def _micro_bundle(dtype=torch.float32):
    path = Path(__file__).parents[1] / "export" / "test_export_onnx.py"
    spec = importlib.util.spec_from_file_location("_export_onnx_helpers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_export_onnx_helpers", module)
    spec.loader.exec_module(module)
    return module.micro_bundle(seed=5, dtype=dtype)


def _pipeline(kernels: KernelBackend, dtype=torch.float32, device: torch.device | None = None) -> TorchPipeline:
    device = device or torch.device("cpu")
    bundle = _micro_bundle(dtype)
    for model in (bundle.predictor, bundle.refiner, bundle.decoder):
        model.to(device)
    for model in (bundle.predictor, bundle.refiner):
        model.set_kernel_backend(kernels)
    return TorchPipeline(bundle.predictor, bundle.refiner, bundle.decoder, bundle.num_classes,
                         tuple(bundle.latent_shape), None, BundleDefaults(schedule="H1P2R2", cfg=1.7), "micro",
                         device, dtype, kernels)


@pytest.fixture(scope="module")
def reference64():
    """Images of the float64 reference path (reference ops, float64 models and state)."""
    pipe = _pipeline(KernelBackend.REFERENCE, torch.float64)
    classes = [4, 0, 2, 1, 3]
    with torch.no_grad():
        noise = make_noise(len(classes), pipe.latent_shape, 3, dtype=torch.float64)
        result = sample_schedule(SCHEDULE, noise, torch.tensor(classes), pipe.predictor, pipe.refiner,
                                 num_classes=pipe.num_classes)
        return classes, pipe.decoder.decode(result.latents)


@requires_triton_device
def test_fast_path_matches_the_float64_reference_and_captures_once_per_batch_size(reference64):
    """Triton kernels where they run (the interpreter on CPU, the GPU on a CUDA machine) with the graph cache's
    counting stand-in, against the float64 reference."""
    classes, want = reference64
    backend = counting_graph_backend()
    sampler = Sampler(_pipeline(KernelBackend.TRITON, device=TRITON_DEVICE), cuda_graph=True, graph_backend=backend)
    out = sampler.sample(classes, schedule=SCHEDULE, seed=3, batch_size=2)  # batches of 2, 2, 1
    torch.testing.assert_close(out.images.double().cpu(), want, **tol("sampler_fp32"))
    assert backend.captures == 2 and backend.replays == 3  # sizes 2 and 1 captured once each
    assert out.times.decode_fused and out.times.capture_s > 0
    assert out.execution == {"device": str(TRITON_DEVICE), "dtype": "float32", "state_dtype": "float32",
                             "kernels": "triton", "cuda_graph": True}
    again = sampler.sample(classes, schedule=SCHEDULE, seed=3, batch_size=2)
    assert backend.captures == 2 and backend.replays == 6 and again.times.capture_s == 0
    assert torch.equal(again.images, out.images)
    other = sampler.sample(classes[:2], schedule=SCHEDULE.with_guidance(2.5, 2), seed=3)  # new schedule: new graph
    assert backend.captures == 3 and other.images.shape[0] == 2


def test_reference_eager_path_matches_the_float64_reference(reference64):
    classes, want = reference64
    out = Sampler(_pipeline(KernelBackend.REFERENCE)).sample(classes, schedule=SCHEDULE, seed=3, batch_size=3)
    torch.testing.assert_close(out.images.double(), want, **tol("sampler_fp32"))
    assert out.execution["cuda_graph"] is False and not out.times.decode_fused


class FailingBackend(ReplayByCallBackend):
    def capture(self, fn, inputs, warmup):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_failed_capture_falls_back_step_by_step_with_one_warning(reference64):
    classes, want = reference64
    sampler = Sampler(_pipeline(KernelBackend.REFERENCE), cuda_graph=True, graph_backend=FailingBackend())
    with pytest.warns(RuntimeWarning, match=r"CUDA-graph capture failed \(RuntimeError: operation not permitted "
                                            r"when stream is capturing\); running step by step"):
        out = sampler.sample(classes, schedule=SCHEDULE, seed=3)
    torch.testing.assert_close(out.images.double(), want, **tol("sampler_fp32"))  # never wrong images
    assert out.execution["cuda_graph"] is False and "capture failed" in out.execution["cuda_graph_fallback"]
    assert "capture failed" in sampler.describe_execution()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no capture attempt, no warning again
        sampler.sample(classes, schedule=SCHEDULE, seed=3)


def test_nan_inside_the_graph_names_the_step():
    pipe = _pipeline(KernelBackend.REFERENCE)
    real = pipe.refiner

    def poisoned(x, t, y, v):  # the refiner goes bad from t = 0.8 (the second call of step 4)
        out = real(x, t, y, v)
        return out * float("nan") if float(t[0]) > 0.7 else out

    pipe.refiner = poisoned
    sampler = Sampler(pipe, cuda_graph=True, graph_backend=ReplayByCallBackend())
    with pytest.raises(SamplingError, match=r"after step 4 \(R, refiner, t 0\.6 -> 0\.8\)"):
        sampler.sample([0, 1], schedule=SCHEDULE, seed=0)


def test_out_of_memory_reports_the_largest_batch_that_fits(monkeypatch):
    sampler = Sampler(_pipeline(KernelBackend.REFERENCE))
    real = sampler._run_batch
    real_forward = sampler._forward

    def limited(schedule, noise, labels):
        if noise.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(schedule, noise, labels)

    monkeypatch.setattr(sampler, "_forward", limited)
    monkeypatch.setattr(sampler, "_run_batch",
                        lambda s, n, y, task=None, rows=None: (limited(s, n, y), real(s, n, y, task))[1])
    with pytest.raises(SamplingError, match=r"a batch of 8 images does not fit in GPU memory.*largest batch that "
                                            r"fits is 3: pass --batch 3"):
        sampler.sample(list(range(5)) + [0, 1, 2], schedule=SCHEDULE, seed=0)


def test_graph_cache_refuses_other_shapes_under_one_key():
    cache = GraphCache(ReplayByCallBackend())
    fn = lambda a: (a * 2,)  # noqa: E731
    first = cache.run("k", fn, (torch.ones(2, 3),))
    assert first.replayed and torch.equal(first.outputs[0], torch.full((2, 3), 2.0))
    second = cache.run("k", fn, (torch.full((2, 3), 5.0),))
    assert torch.equal(second.outputs[0], torch.full((2, 3), 10.0)) and second.capture_s == 0
    second.outputs[0].zero_()  # callers get clones: the static output is untouched
    assert torch.equal(cache.run("k", fn, (torch.full((2, 3), 5.0),)).outputs[0], torch.full((2, 3), 10.0))
    with pytest.raises(ValueError, match="captured for"):
        cache.run("k", fn, (torch.ones(3, 3),))


def test_cuda_only_options_are_refused_on_cpu():
    with pytest.raises(FlowTurboError, match="CUDA graphs need a CUDA device"):
        Sampler(_pipeline(KernelBackend.REFERENCE), cuda_graph=True)
    with pytest.raises(FlowTurboError, match="--kernels triton runs our Triton kernels on CUDA"):
        resolve_kernel_backend("triton", torch.device("cpu"))
    assert resolve_kernel_backend("auto", torch.device("cpu")) is KernelBackend.REFERENCE


def test_fast_path_defaults_follow_the_device(monkeypatch):
    """bfloat16 + our Triton kernels on CUDA (when Triton is installed and works there), float32 + reference ops
    elsewhere; the exported backends' loops pick their solver ops by the same rule."""
    import flowturbo.kernels._common as common
    import flowturbo.kernels.backend as backend
    from flowturbo.kernels import KernelFallbackWarning, default_kernel_backend
    from flowturbo.runtime.pytorch_backend import resolve_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype(None, cuda) is torch.bfloat16 and resolve_dtype("auto", cuda) is torch.bfloat16
    assert resolve_dtype(None, cpu) is torch.float32 and resolve_dtype("float32", cuda) is torch.float32
    monkeypatch.setattr(common, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(backend, "triton_launch_failure", lambda device: None)  # a GPU where Triton works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_kernel_backend(cuda) is KernelBackend.TRITON
        assert resolve_kernel_backend(None, cuda) is KernelBackend.TRITON
        assert resolve_kernel_backend("triton", cuda) is KernelBackend.TRITON
    assert default_kernel_backend(cpu) is KernelBackend.REFERENCE

    # Triton installed but unable to run on this GPU: auto falls back with one warning, an explicit ask is refused
    monkeypatch.setattr(backend, "triton_launch_failure", lambda device: "RuntimeError: no kernel image for sm_50")
    with pytest.warns(KernelFallbackWarning, match=r"cannot run on cuda \(RuntimeError: no kernel image for sm_50\)"):
        assert resolve_kernel_backend("auto", cuda) is KernelBackend.REFERENCE
    with pytest.raises(FlowTurboError, match=r"--kernels triton: .*no kernel image for sm_50.*use --kernels reference"):
        resolve_kernel_backend("triton", cuda)

    monkeypatch.setattr(common, "TRITON_AVAILABLE", False)
    assert default_kernel_backend(cuda) is KernelBackend.REFERENCE  # no Triton: the reference ops, not an error


@requires_triton_device
def test_triton_probe_checks_launches_against_the_references(monkeypatch):
    """The probe runs the solver and adaLN kernels (through the interpreter on CPU, on the GPU with CUDA) and
    compares them with their references: a kernel computing a wrong value or raising is reported, with the
    cause, as not usable."""
    import flowturbo.kernels.backend as backend
    import flowturbo.kernels.solver as solver

    device = TRITON_DEVICE.type
    backend._probe.cache_clear()
    assert backend._probe(device) is None  # the kernels run correctly there
    real = solver.cfg_predict_triton
    backend._probe.cache_clear()
    monkeypatch.setattr(solver, "cfg_predict_triton", lambda *a, **k: tuple(t + 1 for t in real(*a, **k)))
    assert backend._probe(device) == "a probe launch returned wrong values"
    backend._probe.cache_clear()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed\nsecond line")

    monkeypatch.setattr(solver, "cfg_predict_triton", broken)
    assert backend._probe(device) == "RuntimeError: PTX assembly failed"
    backend._probe.cache_clear()


def test_default_sampler_on_cpu_is_the_reference_path():
    sampler = Sampler.from_bundle(device="cpu")
    assert sampler.graphs is None
    assert sampler.execution() == {"device": "cpu", "dtype": "float32", "state_dtype": "float32",
                                   "kernels": "reference", "cuda_graph": False}


# ----------------------------------------------------------------------------- on a GPU (skipped here)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


def _cuda_pipeline(dtype):
    from flowturbo.runtime.pytorch_backend import resolve_kernel_backend

    pipe = _pipeline(KernelBackend.REFERENCE, dtype)
    kernels = resolve_kernel_backend("auto", torch.device("cuda"))
    for model in (pipe.predictor, pipe.refiner, pipe.decoder):
        model.to("cuda")
    for model in (pipe.predictor, pipe.refiner):
        model.set_kernel_backend(kernels)
    pipe.device, pipe.kernel_backend = torch.device("cuda"), kernels
    return pipe


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,key", [(torch.float32, "sampler_fp32"), (torch.bfloat16, "sampler_bf16")])
def test_cuda_fast_path_matches_the_float64_reference(reference64, dtype, key):
    """The real thing: Triton kernels + torch.cuda.graph capture, against the float64 CPU reference."""
    classes, want = reference64
    sampler = Sampler(_cuda_pipeline(dtype))  # the CUDA defaults: graph on
    out = sampler.sample(classes, schedule=SCHEDULE, seed=3, batch_size=2)
    assert out.execution["cuda_graph"] and out.execution["kernels"] == "triton"
    torch.testing.assert_close(out.images.double(), want, **tol(key))
    again = sampler.sample(classes, schedule=SCHEDULE, seed=3, batch_size=2)  # replays only
    assert again.times.capture_s == 0 and torch.equal(again.images, out.images)
    assert len(sampler.graphs) == 2  # batch sizes 2 and 1


@pytest.mark.gpu
@requires_cuda
def test_cuda_capture_failure_falls_back_with_correct_images(reference64):
    classes, want = reference64
    pipe = _cuda_pipeline(torch.float32)
    real = pipe.refiner

    def syncing(x, t, y, v):  # a host sync: illegal while capturing
        float(v.sum())
        return real(x, t, y, v)

    pipe.refiner = syncing
    sampler = Sampler(pipe)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed"):
        out = sampler.sample(classes, schedule=SCHEDULE, seed=3)
    torch.testing.assert_close(out.images.double(), want, **tol("sampler_fp32"))
    assert out.execution["cuda_graph"] is False


def test_cli_prints_a_graph_fallback_as_one_warning_line():
    from flowturbo.runtime.cli import _one_line_warning
    from flowturbo.runtime.cuda_graphs import GraphFallbackWarning

    assert _one_line_warning("CUDA-graph capture failed (X); running step by step", GraphFallbackWarning,
                             "f.py", 3) == "flowturbo: warning: CUDA-graph capture failed (X); running step by step\n"
    assert "UserWarning" in _one_line_warning("other", UserWarning, "f.py", 3)  # others keep Python's format
