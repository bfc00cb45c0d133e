"""Benchmark the fused kernels against eager PyTorch and torch.compile, then a whole SiT-XL/2 forward.

Usage (one GPU, about 3 minutes on an H100):

    python bench/bench_kernels.py --out bench_kernels.json
    python bench/bench_kernels.py --dry-run            # tiny shapes on CPU (Triton interpreter): logic only

Per op (adaLN LayerNorm+modulate, gated residual + LayerNorm+modulate, CFG predict, CFG correct) at
SiT-XL/2 shapes (16 rows x 256 tokens x 1152; latents 16x4x32x32 with an 8-channel learn_sigma raw
output) and a large size: our Triton kernel, the eager PyTorch reference and ``torch.compile`` of the same
reference expression; ``triton.testing.do_bench`` medians (L2 flushed between runs), achieved GB/s of the
bytes each op must move, and that as a fraction of a device-to-device copy measured in the same run.
Then SiT-XL/2 forward (random weights, bf16, 16 rows): eager reference backend, eager Triton backend,
``torch.compile`` (compile time reported apart), each plain and replayed from one CUDA graph.
Full results go to ``--out`` as JSON; a compact markdown table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import git_commit

GUIDANCE_SCALE = 4.0
GUIDANCE_CHANNELS = 3  # the official SiT/FlowTurbo checkpoints guide 3 of 4 latent channels
STEP = 1.0 / 9.0
COPY_BYTES = 512 * 2**20  # bytes of the device-to-device copy that sets the bandwidth yardstick
WARMUP_MS, REP_MS = 25, 100  # do_bench windows
CPU_REPS = 3  # --dry-run timing repetitions (perf_counter median)
CUDA_GRAPH_WARMUP = 3
GRAPH_REPS = 20  # op calls per captured graph when timing device time (small ops are launch-bound)
GRAPH_BYTES_BUDGET = 2 * 2**30  # fewer reps per graph for ops that move more than this / GRAPH_REPS


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one run: adaLN (B, T, D) sizes, solver state (B, C, H, W) sizes, the model preset."""

    adaln: dict[str, tuple[int, int, int]]
    solver: dict[str, tuple[int, int, int, int]]
    model_preset: str
    model_input_size: int
    model_rows: int


GPU_SIZES = Sizes(
    adaln={"SiT-XL/2": (16, 256, 1152), "large": (64, 4096, 1152)},
    solver={"SiT-XL/2": (16, 4, 32, 32), "large": (64, 16, 128, 128)},
    model_preset="SiT-XL/2",
    model_input_size=32,
    model_rows=16,
)
DRY_RUN_SIZES = Sizes(
    adaln={"tiny": (2, 8, 72), "odd": (1, 5, 1151)},
    solver={"tiny": (2, 4, 8, 8)},
    model_preset="SiT-T/2",
    model_input_size=8,
    model_rows=2,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("bench_kernels.json"), help="where to write the full JSON")
    run.add_argument("--dry-run", action="store_true",
                     help="tiny shapes; without CUDA, Triton runs through its interpreter (logic check only)")
    what = parser.add_argument_group("what to run")
    what.add_argument("--skip-ops", action="store_true", help="skip the per-op benchmarks")
    what.add_argument("--skip-model", action="store_true", help="skip the whole-model benchmark")
    what.add_argument("--adaln-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    what.add_argument("--solver-dtypes", default="float32",
                      help="comma list for the solver ops (e.g. float32,bfloat16)")
    what.add_argument("--no-compile", action="store_true", help="skip every torch.compile variant (fast run)")
    what.add_argument("--compile-triton", action="store_true",
                      help="also torch.compile the model with the Triton backend (one more compile, ~1 min)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ timing


class Timer:
    """Median milliseconds of a callable: do_bench on CUDA, perf_counter on CPU (dry run)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))
        fn()
        samples = []
        for _ in range(CPU_REPS):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def copy_bandwidth(timer: Timer, device: str, nbytes: int) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` (read + write counted) over ``nbytes``: the bandwidth yardstick."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return {"bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def capture_cuda_graph(fn: Callable[[], Any]) -> Any:
    """Warm ``fn`` up on a side stream, then capture one call into a CUDA graph (returns the graph)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CUDA_GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# ------------------------------------------------------------------------------------------ ops


def _max_err(a: Any, b: Any) -> float:
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max(float((x.double() - y.double()).abs().max()) for x, y in pairs)


def op_cases(sizes: Sizes, adaln_dtype: Any, solver_dtypes: list[Any], device: str) -> list[dict[str, Any]]:
    """Each case: name, shape label, dtype, bytes moved, and the three implementations as closures."""
    import torch

    from flowturbo.kernels import (
        cfg_correct_reference,
        cfg_correct_triton,
        cfg_predict_reference,
        cfg_predict_triton,
        gated_residual_layernorm_modulate_reference,
        gated_residual_layernorm_modulate_triton,
        layernorm_modulate_reference,
        layernorm_modulate_triton,
    )

    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for label, (batch, tokens, width) in sizes.adaln.items():
        x = torch.randn(batch, tokens, width, device=device, generator=gen).to(adaln_dtype)
        y = torch.randn_like(x)
        mods = (torch.randn(batch, 6 * width, device=device, generator=gen) * 0.5).to(adaln_dtype)
        gate, shift, scale = mods.chunk(6, dim=1)[:3]  # (B, D) views, as the model passes them
        rows_bytes, mod_bytes = x.numel() * x.element_size(), batch * width * x.element_size()

        def ln_ref(x=x, shift=shift, scale=scale):
            return layernorm_modulate_reference(x, shift, scale)

        def gated_ref(x=x, y=y, gate=gate, shift=shift, scale=scale):
            return gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale)

        cases.append(dict(
            op="layernorm_modulate", size=label, shape=[batch, tokens, width],
            dtype=str(x.dtype).removeprefix("torch."),
            bytes=2 * rows_bytes + 2 * mod_bytes,
            triton=lambda x=x, shift=shift, scale=scale: layernorm_modulate_triton(x, shift, scale),
            eager=ln_ref, expr=ln_ref,
        ))
        cases.append(dict(
            op="gated_residual_layernorm_modulate", size=label, shape=[batch, tokens, width],
            dtype=str(x.dtype).removeprefix("torch."), bytes=4 * rows_bytes + 3 * mod_bytes,
            triton=lambda x=x, y=y, gate=gate, shift=shift, scale=scale: gated_residual_layernorm_modulate_triton(
                x, y, gate, shift, scale),
            eager=gated_ref, expr=gated_ref,
        ))
    for dtype in solver_dtypes:
        for label, (batch, channels, height, width) in sizes.solver.items():
            raw_shape = (2 * batch, 2 * channels, height, width)  # CFG rows, learn_sigma channels
            raw = torch.randn(raw_shape, device=device, generator=gen).to(dtype)
            x = torch.randn(batch, channels, height, width, device=device, generator=gen).to(dtype)
            d = torch.randn_like(x)
            base = torch.randn_like(x)
            state = x.numel() * x.element_size()
            guided = state * GUIDANCE_CHANNELS // channels

            def predict_ref(raw=raw, x=x):
                return cfg_predict_reference(raw, x, STEP, GUIDANCE_SCALE, GUIDANCE_CHANNELS)

            def correct_ref(raw=raw, x=x, d=d, base=base):
                return cfg_correct_reference(raw, x, d, STEP, GUIDANCE_SCALE, GUIDANCE_CHANNELS, base)

            shape = [batch, channels, height, width]
            cases.append(dict(
                op="cfg_predict", size=label, shape=shape, dtype=str(dtype).removeprefix("torch."),
                bytes=state + guided + state + 2 * state,  # c, u (guided channels), x; write d, x_pred
                triton=lambda raw=raw, x=x: cfg_predict_triton(raw, x, STEP, GUIDANCE_SCALE, GUIDANCE_CHANNELS),
                eager=predict_ref, expr=predict_ref,
            ))
            cases.append(dict(
                op="cfg_correct (base)", size=label, shape=shape, dtype=str(dtype).removeprefix("torch."),
                bytes=state + guided + 3 * state + 2 * state,  # c, u, x, d, base; write x_new, d2
                triton=lambda raw=raw, x=x, d=d, base=base: cfg_correct_triton(
                    raw, x, d, STEP, GUIDANCE_SCALE, GUIDANCE_CHANNELS, base),
                eager=correct_ref, expr=correct_ref,
            ))
    return cases


def device_ms(timer: Timer, fn: Callable[[], Any], nbytes: int) -> float:
    """Device time of one call: ``reps`` back-to-back calls captured in one CUDA graph, replay time / reps
    (host launch overhead excluded). CPU (dry run): the plain median."""
    if not timer.cuda:
        return timer(fn)
    reps = max(1, min(GRAPH_REPS, GRAPH_BYTES_BUDGET // max(nbytes, 1)))

    def repeated() -> None:
        for _ in range(reps):
            fn()

    graph = capture_cuda_graph(repeated)
    return timer(graph.replay) / reps


def bench_ops(
    cases: list[dict[str, Any]], timer: Timer, copy_gbps: float, compile_backend: str | None
) -> list[dict[str, Any]]:
    import torch

    rows = []
    impls = ["triton", "eager"] + (["compile"] if compile_backend else [])
    for case in cases:
        fns = {"triton": case["triton"], "eager": case["eager"]}
        compile_s = None
        if compile_backend:
            start = time.perf_counter()
            fns["compile"] = torch.compile(case["expr"], fullgraph=True, backend=compile_backend)
            fns["compile"]()
            compile_s = time.perf_counter() - start
        outputs = {name: fn() for name, fn in fns.items()}
        row = {k: v for k, v in case.items() if not callable(v)}
        row["compile_s"] = compile_s
        for name in impls:
            row[f"{name}_launch_ms"] = timer(fns[name])  # one plain call, host overhead included
            row[f"{name}_ms"] = device_ms(timer, fns[name], case["bytes"])
            row[f"{name}_gbps"] = case["bytes"] / (row[f"{name}_ms"] * 1e-3) / 1e9
            row[f"{name}_max_abs_err_vs_eager"] = _max_err(outputs[name], outputs["eager"])
        row["triton_fraction_of_copy"] = row["triton_gbps"] / copy_gbps
        for name in impls[1:]:
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / row["triton_ms"]
        rows.append(row)
        print(f"  {row['op']:<34} {row['size']:<9} {row['dtype']:<9} "
              + "  ".join(f"{name} {1e3 * row[f'{name}_ms']:.1f} us" for name in impls), file=sys.stderr)
    return rows


# ------------------------------------------------------------------------------------------ model


def bench_model(sizes: Sizes, timer: Timer, device: str, dtype: Any, compile_backend: str | None,
                compile_triton: bool) -> list[dict[str, Any]]:
    import torch

    from flowturbo.kernels import KernelBackend
    from flowturbo.training.models import SiT, perturb_zero_initialized, sit_config

    config = sit_config(sizes.model_preset, input_size=sizes.model_input_size)
    with torch.device(device):
        model = SiT(config)
    perturb_zero_initialized(model, generator=torch.Generator().manual_seed(0))  # non-zero adaLN for the check
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(1)
    rows_n = sizes.model_rows
    latent_shape = (rows_n, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(latent_shape, device=device, generator=gen).to(dtype)
    t = torch.rand(rows_n, device=device, generator=gen)
    y = torch.randint(0, config.num_classes, (rows_n,), device=device, generator=gen)

    variants: list[tuple[str, KernelBackend, bool]] = [
        ("eager", KernelBackend.REFERENCE, False),
        ("triton", KernelBackend.TRITON, False),
    ]
    if compile_backend:
        variants.append(("compile", KernelBackend.REFERENCE, True))
    if compile_backend and compile_triton:
        variants.append(("compile+triton", KernelBackend.TRITON, True))
    results, reference_out = [], None
    with torch.no_grad():
        for name, backend, compiled in variants:
            model.set_kernel_backend(backend)
            fn: Callable[[], Any] = lambda: model(x, t, y)  # noqa: E731
            compile_s = 0.0
            if compiled:
                compiled_model = torch.compile(model, backend=compile_backend)
                start = time.perf_counter()
                compiled_model(x, t, y)
                compile_s = time.perf_counter() - start
                fn = lambda compiled_model=compiled_model: compiled_model(x, t, y)  # noqa: E731
            out = fn()
            if reference_out is None:
                reference_out = out
            err = _max_err(out, reference_out)
            plain_ms = timer(fn)
            results.append(dict(variant=name, cuda_graph=False, ms=plain_ms, compile_s=compile_s,
                                max_abs_err_vs_eager=err))
            if device == "cuda":
                graph = capture_cuda_graph(fn)
                results.append(dict(variant=name, cuda_graph=True, ms=timer(graph.replay), compile_s=compile_s,
                                    max_abs_err_vs_eager=err))
            print(f"  model {name:<15} {plain_ms:.3f} ms (compile {compile_s:.1f} s)", file=sys.stderr)
    eager_ms = results[0]["ms"]
    for row in results:
        row.update(preset=sizes.model_preset, rows=rows_n, dtype=str(dtype).removeprefix("torch."),
                   speedup_vs_eager=eager_ms / row["ms"])
    return results


# ------------------------------------------------------------------------------------------ report


def metadata(device: str) -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = git_commit()
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton_version, python=platform.python_version(), commit=commit,
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def markdown(
    meta: dict[str, Any], copy: dict[str, float], ops: list[dict[str, Any]], model: list[dict[str, Any]]
) -> str:
    lines = [f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
             f"copy {copy['gbps']:.0f} GB/s", ""]
    if ops:
        compiled = "compile_ms" in ops[0]
        head = "| op | size | dtype | triton us | eager us | " + ("compile us | " if compiled else "")
        head += "triton GB/s | % copy | x eager |" + (" x compile |" if compiled else "")
        lines += [head, "|" + "---|" * 3 + "---:|" * (head.count("|") - 4)]
        for r in ops:
            cells = [r["op"], f"{r['size']} {'x'.join(map(str, r['shape']))}", r["dtype"],
                     f"{1e3 * r['triton_ms']:.1f}", f"{1e3 * r['eager_ms']:.1f}"]
            cells += [f"{1e3 * r['compile_ms']:.1f}"] if compiled else []
            cells += [f"{r['triton_gbps']:.0f}", f"{100 * r['triton_fraction_of_copy']:.0f}%",
                      f"{r['speedup_vs_eager']:.2f}"]
            cells += [f"{r['speedup_vs_compile']:.2f}"] if compiled else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "(op times: device time per call from CUDA-graph replays of back-to-back calls; "
                  "plain-launch times are in the JSON)", ""]
    if model:
        lines += ["| model | rows | dtype | variant | CUDA graph | ms | x eager | compile s | max err |",
                  "|---|---:|---|---|---|---:|---:|---:|---:|"]
        for r in model:
            lines.append(f"| {r['preset']} | {r['rows']} | {r['dtype']} | {r['variant']} | "
                         f"{'yes' if r['cuda_graph'] else 'no'} | {r['ms']:.3f} | {r['speedup_vs_eager']:.2f} | "
                         f"{r['compile_s']:.1f} | {r['max_abs_err_vs_eager']:.2e} |")
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_kernels: no CUDA device; use --dry-run for the CPU logic check", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before flowturbo.kernels is imported
    device = "cuda" if cuda else "cpu"
    sizes = DRY_RUN_SIZES if args.dry_run else GPU_SIZES
    timer = Timer(cuda)
    compile_backend = None if args.no_compile else "inductor" if cuda else "aot_eager"  # CPU: trace only
    adaln_dtype = getattr(torch, args.adaln_dtype) if cuda else torch.float32  # interpreter bf16 is wrong
    solver_dtypes = [getattr(torch, name) for name in args.solver_dtypes.split(",") if name]
    if not cuda:
        solver_dtypes = [torch.float32]
    model_dtype = torch.bfloat16 if cuda else torch.float32

    meta = metadata(device)
    copy = copy_bandwidth(timer, device, COPY_BYTES if cuda else COPY_BYTES // 64)
    print(f"copy: {copy['gbps']:.0f} GB/s", file=sys.stderr)
    ops = [] if args.skip_ops else bench_ops(op_cases(sizes, adaln_dtype, solver_dtypes, device), timer,
                                             copy["gbps"], compile_backend)
    model = [] if args.skip_model else bench_model(sizes, timer, device, model_dtype, compile_backend,
                                                   args.compile_triton)
    payload = dict(meta=meta, args={k: str(v) for k, v in vars(args).items()}, sizes=dataclasses.asdict(sizes),
                   copy=copy, ops=ops, model=model, total_s=time.perf_counter() - started)
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out} ({payload['total_s']:.0f} s in all)", file=sys.stderr)
    print(markdown(meta, copy, ops, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
