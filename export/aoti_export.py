"""AOTInductor packages: ``torch.export`` with the spec's dynamic batch, then ``aoti_compile_and_package``.

On CPU this compiles C++ (~20 s for a small model on 2 cores); on CUDA the Triton kernels are compiled
into the package. Load with ``torch._inductor.aoti_load_package`` (the runtime's ``aoti`` backend does).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.export.specs import ModuleSpec

PACKAGE_SUFFIX = ".pt2"


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
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except FlowTurboError:
        raise
    except Exception as exc:  # torch.export / inductor raise many types; name the module and keep the cause
        raise FlowTurboError(f"AOTInductor export of {spec.name} failed: {type(exc).__name__}: {exc}") from exc
    return time.perf_counter() - start


__all__ = ["PACKAGE_SUFFIX", "export_aoti"]
