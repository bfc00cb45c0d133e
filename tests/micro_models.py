"""Helpers for the tiny test models: make their time and label paths matter.

DiT initialisation (N(0, 0.02) embeddings, zero adaLN layers perturbed by 0.02) leaves a tiny random model
whose output barely depends on t or the class (moving t from 0.5 to 1.0 changed a micro refiner's output by
4.5e-5, under the export tolerance), so a graph wired to the wrong time or label would pass parity tests.
:func:`strengthen_conditioning` redraws those weights at unit scale so every path's parity test bites.
"""

from __future__ import annotations

import math

import torch

SENSITIVITY_FACTOR = 100  # outputs at t=0 vs t=1 (and for two labels) differ by >= this x the export tolerance


@torch.no_grad()
def strengthen_conditioning(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Unit-scale timestep MLP, label table and adaLN modulation weights (in place); returns ``model``."""
    hidden = model.pos_embed.shape[-1]
    mlp = model.t_embedder.mlp
    for layer, fan_in in ((mlp[0], mlp[0].weight.shape[1]), (mlp[2], hidden)):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2.0 / math.sqrt(fan_in)))
    table = model.y_embedder.embedding_table.weight
    table.copy_(torch.randn(table.shape, generator=generator))
    modulations = [block.adaLN_modulation[-1] for block in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
    for layer in modulations:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(hidden))
    return model
