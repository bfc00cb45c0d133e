"""Whole-batch CUDA graphs: capture a function of static input buffers once per batch size, replay per request.

:class:`GraphCache` holds, per key (the sampler uses ``(schedule id, batch size)``), static input buffers, a
captured graph and its static outputs. A request copies its inputs into the buffers, replays the graph and
clones the outputs (the next replay overwrites them). Capture follows PyTorch's recipe: warm-up runs on a
side stream (first calls compile Triton kernels and allocate workspaces), then ``torch.cuda.graph``.

A capture that fails (an op that syncs with the host, an unsupported kernel, ...) is never fatal: the key
is marked, the caller is told why (:attr:`GraphCache.fallback_reason`, one warning) and runs the function
step by step instead — never wrong outputs. Capture seconds are measured apart from replay seconds.

The capture mechanism is a small :class:`CaptureBackend` so the cache logic (static buffers, per-size
capture, copies, fallback) is tested on CPU with :class:`ReplayByCallBackend`, which "replays" by calling
the function again on the static buffers; on CUDA it is :class:`TorchCudaGraphBackend`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch

from flowturbo.errors import FlowTurboWarning

# fn(*static_inputs) -> tuple of output tensors
GraphFn = Callable[..., Sequence[torch.Tensor]]


class GraphFallbackWarning(FlowTurboWarning, RuntimeWarning):
    """A CUDA-graph capture failed; the work runs step by step instead (the message names the cause)."""


class CaptureBackend(Protocol):
    """How a function is captured and replayed."""

    def capture(self, fn: GraphFn, inputs: Sequence[torch.Tensor], warmup: int) -> tuple[Any, list[torch.Tensor]]:
        """Warm up, capture ``fn(*inputs)``; return (graph handle, static outputs)."""

    def replay(self, graph: Any) -> None:
        """Run the captured work again (the static outputs then hold the new results)."""


class TorchCudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture: warm-up on a side stream, then capture on the graph's stream."""

    def capture(self, fn: GraphFn, inputs: Sequence[torch.Tensor], warmup: int) -> tuple[Any, list[torch.Tensor]]:
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = list(fn(*inputs))
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


class ReplayByCallBackend:
    """A stand-in for tests and CPU dry runs: 'replay' calls the function again on the static inputs and
    copies its results into the static outputs — the cache's buffer semantics without a GPU."""

    def capture(self, fn: GraphFn, inputs: Sequence[torch.Tensor], warmup: int) -> tuple[Any, list[torch.Tensor]]:
        for _ in range(max(1, warmup)):
            fn(*inputs)
        outputs = [o.clone() for o in fn(*inputs)]
        return (fn, list(inputs), outputs), outputs

    def replay(self, graph: Any) -> None:
        fn, inputs, outputs = graph
        for static, fresh in zip(outputs, fn(*inputs)):
            static.copy_(fresh)


@dataclasses.dataclass
class _Entry:
    inputs: list[torch.Tensor]
    graph: Any
    outputs: list[torch.Tensor]
    capture_s: float


@dataclasses.dataclass(frozen=True)
class GraphRun:
    """The outputs of one request and how they were produced."""

    outputs: list[torch.Tensor]
    replayed: bool  # False: ran step by step (graphs disabled or capture failed)
    capture_s: float  # seconds spent capturing for this request (0 when the graph existed)


class GraphCache:
    """One captured graph per key; see the module docstring."""

    def __init__(self, backend: CaptureBackend | None = None, *, warmup: int = 2) -> None:
        self.backend: CaptureBackend = backend or TorchCudaGraphBackend()
        self.warmup = warmup
        self._entries: dict[Hashable, _Entry] = {}
        self._failed: dict[Hashable, str] = {}
        self.fallback_reason: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def captured_keys(self) -> list[Hashable]:
        return list(self._entries)

    def run(self, key: Hashable, fn: GraphFn, inputs: Sequence[torch.Tensor]) -> GraphRun:
        """``fn(*inputs)`` through the graph of ``key`` (captured on first use), or directly if capture failed.

        The graph is captured for the shapes/dtypes of the first inputs under ``key``; later inputs must match.
        """
        entry = self._entries.get(key)
        capture_s = 0.0
        if entry is None and key not in self._failed:
            started = time.perf_counter()
            entry = self._capture(key, fn, inputs)
            capture_s = time.perf_counter() - started
        if entry is None:  # capture failed for this key: step by step, every time
            return GraphRun([o for o in fn(*inputs)], replayed=False, capture_s=capture_s)
        for static, value in zip(entry.inputs, inputs):
            if static.shape != value.shape or static.dtype != value.dtype:
                raise ValueError(f"graph {key!r} was captured for {tuple(static.shape)} {static.dtype} inputs, "
                                 f"got {tuple(value.shape)} {value.dtype}")
            static.copy_(value)
        self.backend.replay(entry.graph)
        return GraphRun([o.clone() for o in entry.outputs], replayed=True, capture_s=capture_s)

    def _capture(self, key: Hashable, fn: GraphFn, inputs: Sequence[torch.Tensor]) -> _Entry | None:
        static = [t.clone() for t in inputs]
        started = time.perf_counter()
        try:
            graph, outputs = self.backend.capture(fn, static, self.warmup)
        except torch.OutOfMemoryError:
            raise  # not a capture problem: the caller reports the batch that fits
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to step-by-step execution
            reason = f"CUDA-graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); " \
                     "running step by step"
            self._failed[key] = reason
            self.fallback_reason = reason
            warnings.warn(reason, GraphFallbackWarning, stacklevel=3)
            _recover_after_failed_capture()
            return None
        entry = _Entry(static, graph, outputs, time.perf_counter() - started)
        self._entries[key] = entry
        return entry

    def clear(self) -> None:
        """Drop every captured graph (frees their memory pools)."""
        self._entries.clear()
        self._failed.clear()


def _recover_after_failed_capture() -> None:
    """Leave the device usable after an aborted capture (synchronise, free the pool's cached blocks)."""
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except RuntimeError:
            pass  # the sticky error (if any) surfaces at the step-by-step run, with its own message
        torch.cuda.empty_cache()


__all__ = ["CaptureBackend", "GraphCache", "GraphFallbackWarning", "GraphRun", "ReplayByCallBackend", "TorchCudaGraphBackend"]
