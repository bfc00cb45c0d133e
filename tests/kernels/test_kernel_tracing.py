"""The custom ops trace: torch.library.opcheck, torch.compile(fullgraph=True) and torch.export.

On CPU (the interpreter) the traced decomposition is the reference; on CUDA it is the Triton kernel.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from flowturbo.kernels import cfg_correct, cfg_predict, gated_residual_layernorm_modulate, layernorm_modulate

B, T, D = 2, 3, 72  # adaLN: (B, T, D) tokens
C, C_OUT, HW = 4, 8, 3  # solver: (B, C, HW, HW) state, (2B, C_OUT, HW, HW) raw output
STEP, GUIDANCE = 0.125, 4.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

OPS = ["layernorm_modulate", "gated_residual_layernorm_modulate", "cfg_predict", "cfg_correct"]


class AllOps(torch.nn.Module):
    """A block's adaLN glue followed by a Heun step's two fused solver updates, all via backend='triton'."""

    def forward(self, x, y, mods, raw, state, velocity):
        gate, shift, scale = mods.chunk(6, dim=1)[:3]  # (B, D) views, row stride 6D
        h = layernorm_modulate(x, shift, scale, backend="triton")  # (B, T, D)
        x_new, h2 = gated_residual_layernorm_modulate(x, h + y, gate, shift, scale, backend="triton")
        d, x_pred = cfg_predict(raw, state, STEP, GUIDANCE, 3, backend="triton")  # (B, C, HW, HW) x2
        x_next, d2 = cfg_correct(raw * 0.5, state, d, STEP, GUIDANCE, None, base=velocity, backend="triton")
        return x_new, h2, x_pred, x_next, d2


def _inputs(seed=0, batch=B, tokens=T):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, tokens, D), (batch, tokens, D), (batch, 6 * D), (2 * batch, C_OUT, HW, HW),
              (batch, C, HW, HW), (batch, C, HW, HW)]
    return tuple(torch.randn(shape, generator=gen).to(DEVICE) for shape in shapes)


def _op_args(name):
    x, y, mods, raw, state, velocity = _inputs(1)
    gate, shift, scale = mods.chunk(6, dim=1)[:3]
    return {
        "layernorm_modulate": (x, shift, scale, 1e-6),
        "gated_residual_layernorm_modulate": (x, y, gate, shift, scale, 1e-6),
        "cfg_predict": (raw, state, STEP, GUIDANCE, 3, None),
        "cfg_correct": (raw, state, velocity, STEP, GUIDANCE, 4, state * 2),
    }[name]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of each custom op."""
    op = getattr(torch.ops.flowturbo, name).default
    results = torch.library.opcheck(op, _op_args(name))
    assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_fullgraph_inductor():
    module, inputs = AllOps(), _inputs()
    eager = module(*inputs)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")(*inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_torch_export_keeps_one_node_per_op_and_runs():
    module, inputs = AllOps(), _inputs()
    batch = torch.export.Dim("batch", min=1, max=64)
    tokens = torch.export.Dim("tokens", min=1, max=1024)
    dynamic = ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: batch}, {0: 2 * batch}, {0: batch}, {0: batch})
    exported = torch.export.export(module, inputs, dynamic_shapes=dynamic)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    for name in OPS:
        assert targets.count(f"flowturbo.{name}.default") == 1, targets
    for other in (inputs, _inputs(seed=2, batch=3, tokens=5)):  # the traced shapes, then another batch / T
        for a, b in zip(exported.module()(*other), module(*other)):
            torch.testing.assert_close(a, b, **tol(torch.float32))
