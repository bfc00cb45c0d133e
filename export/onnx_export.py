"""ONNX export of one wrapper module against its spec (``torch.onnx.export``, dynamo exporter).

The TorchScript exporter (``dynamo=False``) cannot export the models' LayerNorm with a dynamic batch
(it needs a constant normalized shape), so the dynamo exporter is the one used. It silently falls back to
static shapes when ``torch.export`` cannot keep an axis symbolic, so :func:`export_onnx` checks the written
graph and refuses a specialised batch axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from pathlib import Path

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.export.specs import BATCH_AXIS, ModuleSpec

MIN_OPSET = 18  # the dynamo exporter's lowest opset (LayerNormalization-17, Split with num_outputs ...)
DEFAULT_OPSET = 18
INLINE_WEIGHTS_LIMIT_BYTES = 1 << 30  # protobuf caps a model at 2 GiB: above 1 GiB, weights go to .onnx.data
ONNX_PRECISIONS = ("fp32", "fp16")  # ONNX Runtime's CPU provider has no bfloat16 kernels for these graphs
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64"}


@dataclasses.dataclass(frozen=True)
class OnnxExportResult:
    """What one export wrote: the files (graph, and external data when large) and the seconds it took."""

    files: tuple[Path, ...]
    seconds: float
    external_data: bool


def max_opset() -> int:
    """Highest opset the installed ``onnx`` package knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """Refuse opsets the exporter cannot write (below 18) or ``onnx`` does not know."""
    highest = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= highest:
        raise FlowTurboError(
            f"ONNX opset {opset!r} is not supported: the dynamo exporter writes opset {MIN_OPSET}..{highest} "
            f"with this onnx {__import__('onnx').__version__}; pass --opset {DEFAULT_OPSET}"
        )
    return opset


def check_onnx_precision(precision: str) -> str:
    if precision not in ONNX_PRECISIONS:
        raise FlowTurboError(
            f"precision {precision!r} cannot be exported to ONNX for ONNX Runtime (no {precision} CPU kernels); "
            f"use one of {', '.join(ONNX_PRECISIONS)}, or --format aoti/tensorrt for {precision}"
        )
    return precision


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (shared weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _check_symbolic_batch(path: Path, spec: ModuleSpec) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for tensor in (*spec.inputs, *spec.outputs):
        value = values.get(tensor.name)
        if value is None:
            raise FlowTurboError(f"exported ONNX graph {path.name} lacks {tensor.name!r}; it has {sorted(values)}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            raise FlowTurboError(f"{path.name}: {tensor.name} has rank {len(dims)}, spec says {len(tensor.shape)}")
        if tensor.batched and not spec.batch.is_static and not dims[0].dim_param:
            raise FlowTurboError(
                f"the ONNX exporter specialised the {BATCH_AXIS} axis of {tensor.name} in {path.name} to "
                f"{dims[0].dim_value}; the module's forward must keep the batch symbolic (no chunk(2) on it)"
            )


def export_onnx(
    module: torch.nn.Module,
    spec: ModuleSpec,
    example_inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
) -> OnnxExportResult:
    """Export ``module`` to ``path`` with ``spec``'s names and dynamic batch; validate with ``onnx.checker``.

    Weights are inline below :data:`INLINE_WEIGHTS_LIMIT_BYTES`, else in ``path + '.data'``.
    """
    import onnx

    check_opset(opset)
    external = weight_bytes(module) > INLINE_WEIGHTS_LIMIT_BYTES
    args = tuple(example_inputs[name] for name in spec.input_names)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log):
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                dynamo=True,
                external_data=external,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=spec.export_dynamic_shapes(),
                optimize=True,
                verbose=False,
            )
    except FlowTurboError:
        raise
    except Exception as exc:  # the exporter raises many types; name the module and keep the cause
        raise FlowTurboError(f"ONNX export of {spec.name} failed: {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    onnx.checker.check_model(str(path), full_check=True)
    _check_symbolic_batch(path, spec)
    return OnnxExportResult(tuple(files), seconds, external)


def run_onnx(path: Path, inputs: dict[str, torch.Tensor], *, threads: int | None = None) -> list[torch.Tensor]:
    """Run a graph once on ONNX Runtime's CPU provider (export-time validation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


__all__ = [
    "DEFAULT_OPSET",
    "INLINE_WEIGHTS_LIMIT_BYTES",
    "MIN_OPSET",
    "OnnxExportResult",
    "check_onnx_precision",
    "check_opset",
    "export_onnx",
    "max_opset",
    "run_onnx",
    "weight_bytes",
]
