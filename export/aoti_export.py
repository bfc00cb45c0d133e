"""AOTInductor packages: ``torch.export`` with the spec's dynamic batch, then ``aoti_compile_and_package``.

On CPU this compiles C++ (~20 s for a small model on 2 cores); on CUDA the Triton kernels are compiled
into the package. Load with ``torch._inductor.aoti_load_package`` (the runtime's ``aoti`` backend does).

The batch axis must stay symbolic through Inductor, not only through ``torch.export``: see
:func:`_keep_batch_dynamic` for the ATen convolution heuristic that silently made packages static
(a 1:16:16 profile gave a batch-16-only package that read out of bounds at batch 1), and
:func:`_check_batch_dynamic` for the check that refuses such a package.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.export.specs import ModuleSpec

PACKAGE_SUFFIX = ".pt2"


@contextlib.contextmanager
def _keep_batch_dynamic() -> Iterator[None]:
    """Compile without letting ATen's CPU convolution heuristics guard on the dynamic batch.

    Inductor re-runs fake-tensor propagation over the exported graph with the export's (frozen) ShapeEnv.
    For a stride-1, undilated convolution the fake kernel asks ``torch._C._select_conv_backend`` which CPU
    backend eager would pick, and that choice reads ``batch >= 16`` (oneDNN's size heuristic through
    ``guard_or_false``, NNPACK's through a hard guard). The frozen ShapeEnv logs "Ignored guard s >= 16"
    but still narrows the batch's value range with it; when the traced batch is the profile's max (16 in
    ``1:16:16``, where ``opt == max``) the range collapses to [16, 16] and the symbol is replaced by 16
    everywhere, so the package is static at 16 while the manifest says 1..16 (no error at build time; at
    batch 1 the kernels read 16 rows of a 1-row input: "index out of bounds: 0 <= tmp3 < 11" in the label
    embedding, or 16 garbage images from a decoder-only package).

    ``backed_size_oblivious`` makes ``guard_or_false`` answer its general-case default (False) instead of
    guarding at the traced value; NNPACK is switched off for the compile so its hard guard is never reached
    (eager never runs NNPACK for these convolutions while oneDNN is enabled: oneDNN takes every float32 CPU
    convolution with batch >= 16, and NNPACK needs batch >= 16). Both settings are restored afterwards and
    only affect which code Inductor generates, not the package's run-time behaviour; the memory format the
    fake kernel then reports (thnn / oneDNN) is the same for both backends.
    """
    with contextlib.ExitStack() as stack:
        config = getattr(torch.fx.experimental, "_config", None)
        if config is not None and hasattr(config, "backed_size_oblivious"):
            stack.enter_context(config.patch(backed_size_oblivious=True))
        stack.enter_context(torch.backends.nnpack.flags(enabled=False))
        yield


def _check_batch_dynamic(program: torch.export.ExportedProgram, spec: ModuleSpec) -> None:
    """Refuse a package whose compile specialised or narrowed the symbolic batch (see :func:`_keep_batch_dynamic`).

    Reads the export's ShapeEnv after Inductor ran (Inductor records its guards there). A lower bound of 2
    for a profile starting at 1 is the usual 0/1 specialisation and is fine (export traces with the same).
    """
    if spec.batch.is_static:
        return
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for tensor in spec.inputs:
        node = placeholders.get(tensor.name)
        if not tensor.batched or node is None:
            continue
        size = node.meta.get("val").shape[0] if node.meta.get("val") is not None else None
        if isinstance(size, int):
            bad = f"specialised to {size}"
        elif isinstance(size, torch.SymInt):
            try:  # ShapeEnv internals: skip the check (not the export) if a torch release renames them
                shape_env = size.node.shape_env
                expr = shape_env.replace(size.node.expr)
                if expr.is_number:
                    bad = f"specialised to {int(expr)}"
                else:
                    bounds = shape_env.bound_sympy(expr)
                    low, high = bounds.lower, bounds.upper
                    ok = high >= spec.batch.max and low <= max(spec.batch.min, 2)
                    bad = None if ok else f"narrowed to [{low}, {high}]"
            except (AttributeError, TypeError):
                return
        else:
            return
        if bad is not None:
            raise FlowTurboError(
                f"AOTInductor compiled {spec.name} for a fixed batch: the batch axis of input {tensor.name!r} was "
                f"{bad} instead of staying dynamic over {spec.batch.describe()}; the package would misbehave at "
                "other batch sizes. Export with a static profile (e.g. --batch 16) or report it with the manifest"
            )
        return  # every batched input shares the one batch symbol


def export_aoti(
    module: torch.nn.Module, spec: ModuleSpec, example_inputs: dict[str, torch.Tensor], path: Path
) -> float:
    """Compile ``module`` into the AOTInductor package ``path`` (``.pt2``); returns the seconds taken."""
    if path.suffix != PACKAGE_SUFFIX:
        raise FlowTurboError(f"an AOTInductor package must end in {PACKAGE_SUFFIX}, got {path.name}")
    args = tuple(example_inputs[name] for name in spec.input_names)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), args, dynamic_shapes=spec.export_dynamic_shapes(), strict=False)
            with _keep_batch_dynamic():
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            _check_batch_dynamic(program, spec)
    except FlowTurboError:
        raise
    except Exception as exc:  # torch.export / inductor raise many types; name the module and keep the cause
        raise FlowTurboError(f"AOTInductor export of {spec.name} failed: {type(exc).__name__}: {exc}") from exc
    return time.perf_counter() - start


__all__ = ["PACKAGE_SUFFIX", "export_aoti"]
