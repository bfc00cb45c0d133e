"""Helpers for the tiny test models: make their time and label paths matter.

DiT initialisation (N(0, 0.02) embeddings, zero adaLN layers perturbed by 0.02) leaves a tiny random model
whose output barely depends on t or the class (moving t from 0.5 to 1.0 changed a micro refiner's output by
4.5e-5, under the export tolerance), so a graph wired to the wrong time or label would pass parity tests.
:func:`strengthen_conditioning` redraws those weights at unit scale so every path's parity test bites.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

SENSITIVITY_FACTOR = 100  # outputs at t=0 vs t=1 (and for two labels) differ by >= this x the export tolerance


@torch.no_grad()
def strengthen_conditioning(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Unit-scale timestep MLP (and a dt-conditioned refiner's dt MLP, whose output layer starts at zero), label
    table and adaLN modulation weights (in place); returns ``model``."""
    hidden = model.pos_embed.shape[-1]
    embedders = [model.t_embedder] + ([model.dt_embedder] if getattr(model, "dt_embedder", None) is not None else [])
    for mlp in (embedder.mlp for embedder in embedders):
        for layer, fan_in in ((mlp[0], mlp[0].weight.shape[1]), (mlp[2], hidden)):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2.0 / math.sqrt(fan_in)))
    table = model.y_embedder.embedding_table.weight
    table.copy_(torch.randn(table.shape, generator=generator))
    modulations = [block.adaLN_modulation[-1] for block in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
    for layer in modulations:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / math.sqrt(hidden))
    return model


MICRO_LATENT = (3, 6, 6)  # (C, H, W) of the micro models


def micro_models(seed: int, *, num_classes: int = 5, dt_conditioning: bool = False,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A depth-1, width-32 SiT and its refiner (dt-conditioned if asked) on (3, 6, 6) latents, random non-zero
    weights from ``seed`` with strong time / label (/ dt) paths (:func:`strengthen_conditioning`), in eval mode."""
    from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner, perturb_zero_initialized

    generator = torch.Generator().manual_seed(seed)
    config = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                       mlp_ratio=2.0, num_classes=num_classes, class_dropout_prob=0.1, learn_sigma=False)
    predictor = SiT(config)
    predictor.initialize_weights(generator)
    perturb_zero_initialized(predictor, generator=generator)
    strengthen_conditioning(predictor, generator)
    refiner = VelocityRefiner(RefinerConfig.for_predictor(config, dt_conditioning=dt_conditioning))
    refiner.initialize_weights(generator)
    perturb_zero_initialized(refiner, generator=generator)
    strengthen_conditioning(refiner, generator)
    return predictor.to(dtype).eval(), refiner.to(dtype).eval()


def save_tiny_bundle(folder: Path, seed: int) -> Path:
    """A depth-1, width-32 SiT + refiner on (3, 6, 6) latents with an identity decoder and 10 classes, random
    non-zero weights from ``seed``, saved into ``folder`` (exports and CLI runs in seconds); returns the path."""
    from flowturbo.training.bundle import Bundle, BundleDefaults, save_bundle
    from flowturbo.training.decoders import IdentityDecoder
    from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner, perturb_zero_initialized

    generator = torch.Generator().manual_seed(seed)
    config = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                       mlp_ratio=2.0, num_classes=10, class_dropout_prob=0.1, learn_sigma=False)
    predictor = SiT(config)
    predictor.initialize_weights(generator)
    perturb_zero_initialized(predictor, generator=generator)
    refiner = VelocityRefiner(RefinerConfig.for_predictor(config))
    refiner.initialize_weights(generator)
    perturb_zero_initialized(refiner, generator=generator)
    bundle = Bundle(predictor.eval(), refiner.eval(), IdentityDecoder(3).eval(), None, BundleDefaults("H1P1R1"))
    return save_bundle(bundle, folder)


def rewrite_manifest(root: Path, edit) -> Path:
    """Apply ``edit(manifest)`` to the export directory ``root``'s manifest, then re-derive its key from its
    ``key_fields`` and re-seal it, as the exporter would have written it: for tests that need a manifest that is
    *consistent* but says something else than the one exported (``edit`` must change the top-level values and
    the keyed ones alike). Returns ``root``."""
    from flowturbo.export.manifest import MANIFEST_FILE
    from flowturbo.fileio import artifact_key, read_sealed_json, sealed_json_bytes

    manifest = read_sealed_json(root / MANIFEST_FILE, fix="")
    edit(manifest)
    manifest["key"] = artifact_key(manifest["key_fields"])
    (root / MANIFEST_FILE).write_bytes(sealed_json_bytes(manifest))
    return root


def counting_graph_backend():
    """The CPU stand-in for ``torch.cuda.graph`` (``ReplayByCallBackend``: replay = call the captured function on
    the static buffers) counting its ``captures`` and ``replays``."""
    from flowturbo.runtime.cuda_graphs import ReplayByCallBackend

    class CountingBackend(ReplayByCallBackend):
        def __init__(self) -> None:
            self.captures = self.replays = 0

        def capture(self, fn, inputs, warmup):
            self.captures += 1
            return super().capture(fn, inputs, warmup)

        def replay(self, graph):
            self.replays += 1
            super().replay(graph)

    return CountingBackend()
