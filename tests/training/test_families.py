"""The predictor protocol's adapters: SiT as the first family (bit for bit the reference sampler), the diffusers
families' registry, and the rule that keeps a new family one adapter (docs/predictor_protocol.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from micro_models import MICRO_LATENT, micro_models

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.families import ClassConditioning, ConditioningKind, ImageSize, ModelFamily
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import BundleDefaults
from flowturbo.training.decoders import IdentityDecoder
from flowturbo.training.families import PIPELINE_FAMILIES, recognize_pipeline
from flowturbo.training.families.sit import SiTFamily
from flowturbo.training.sampling import make_noise, run_schedule, sample_schedule

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("flowturbo", "kernels", "training", "export", "runtime")
REGISTRY = "training/families/__init__.py"
TEXT_FLAGS = "runtime/text_cli.py"  # the command line's text-to-image flags (their help names the pipelines)
# What code that knows a diffusers family must name: its pipeline and transformer classes, its adapter.
FAMILY_MARKERS = {
    "training/families/sd3.py": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "SD3Family", "families.sd3"),
    "training/families/flux.py": ("FluxPipeline", "FluxTransformer2DModel", "FluxFamily", "families.flux",
                                  "guidance_embeds"),
}


def _modules_naming(markers, root: Path = REPO) -> set[str]:
    """Source modules (under the package folders of ``root``) whose text holds one of ``markers``."""
    pattern = re.compile("|".join(re.escape(m) for m in markers))
    return {path.relative_to(root).as_posix() for folder in SOURCE_FOLDERS for path in (root / folder).rglob("*.py")
            if pattern.search(path.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("adapter", sorted(FAMILY_MARKERS))
def test_a_diffusers_family_is_known_to_its_adapter_the_registry_and_the_text_flags_only(adapter):
    """The sampler, the CLI's sample flow, the output writer, the step loop... never name SD3 or FLUX: a new family
    is one adapter module plus its registry line (and, if it wants, a word in the text flags' help)."""
    naming = _modules_naming(FAMILY_MARKERS[adapter])
    assert naming <= {adapter, REGISTRY, TEXT_FLAGS}, sorted(naming - {adapter, REGISTRY, TEXT_FLAGS})
    assert {adapter, REGISTRY} <= naming


def test_the_family_scan_sees_a_module_naming_a_family(tmp_path):
    """The checker itself finds a mention (guards against a scan that finds nothing)."""
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "sneaky.py").write_text("if pipe_class == 'FluxPipeline':\n    pack()\n")
    assert _modules_naming(FAMILY_MARKERS["training/families/flux.py"], tmp_path) == {"runtime/sneaky.py"}


def test_the_registry_holds_protocol_adapters():
    assert set(PIPELINE_FAMILIES) == {"StableDiffusion3Pipeline", "FluxPipeline"}
    for family in PIPELINE_FAMILIES.values():
        for member in ("latent_shape", "image_size", "timesteps", "check_schedule", "check_request", "condition",
                       "model_calls", "decode", "describe", "conditioning_kind"):
            assert hasattr(family, member), (family, member)
        assert family.conditioning_kind is ConditioningKind.PROMPTS


def test_recognize_names_the_adapter(tiny_pipelines):
    for name, pipeline_class in (("sd3", "StableDiffusion3Pipeline"), ("flux_dev", "FluxPipeline")):
        folder, family = recognize_pipeline(tiny_pipelines[name])
        assert folder.class_name == pipeline_class and family is PIPELINE_FAMILIES[pipeline_class]


# ------------------------------------------------------------------------------------------------- SiT
@pytest.fixture(scope="module")
def sit():
    predictor, refiner = micro_models(7)
    family = SiTFamily(predictor, refiner, IdentityDecoder(MICRO_LATENT[0]), 5, MICRO_LATENT,
                       BundleDefaults("H1P1R1", 2.0, 2))
    return family, predictor, refiner


@pytest.mark.parametrize("spec, cfg, channels", [("H1P2R2", 2.5, 2), ("H2E1", 1.0, None), ("P1R1E1", 3.0, None)])
def test_sit_family_is_the_reference_sampler_bit_for_bit(sit, spec, cfg, channels):
    """Conditioning + model calls of the SiT adapter through run_schedule = sample_schedule (partial guidance with
    the per-half carry, no guidance, R after P)."""
    family, predictor, refiner = sit
    schedule = SamplingSchedule.parse(spec, guidance_scale=cfg, guidance_channels=channels)
    noise = make_noise(3, MICRO_LATENT, 4)
    with torch.no_grad():
        conditioning = family.condition([4, 0, 2], schedule)
        got = run_schedule(schedule, noise, family.model_calls(conditioning, schedule)).latents
        want = sample_schedule(schedule, noise, torch.tensor([4, 0, 2]), predictor, refiner, num_classes=5).latents
    assert torch.equal(got, want)


def test_sit_family_protocol_and_refusals(sit):
    family = sit[0]
    assert isinstance(family, ModelFamily)
    assert family.defaults.schedule == "H1P1R1" and family.defaults.guidance_channels == 2
    assert family.timesteps(4, MICRO_LATENT) is None and family.image_size(MICRO_LATENT) == ImageSize(6, 6)
    assert family.latent_shape(ImageSize(6, 6)) == MICRO_LATENT
    with pytest.raises(FlowTurboError, match="makes 6x6 images only"):
        family.latent_shape(ImageSize(8, 8))
    schedule = SamplingSchedule.parse("H2")
    with pytest.raises(FlowTurboError, match="conditioned on class ids"):
        family.condition(["a cat"], schedule)
    with pytest.raises(SamplingError, match=r"outside \[0, 5\)"):
        family.condition([5], schedule)
    with pytest.raises(FlowTurboError, match="--cfg"):
        family.condition([1], schedule, guidance=3.0)
    with pytest.raises(SamplingError, match="more than this model's 3 latent channels"):
        family.check_schedule(SamplingSchedule.parse("H2", guidance_scale=2.0, guidance_channels=4))
    assert isinstance(family.condition([1, 2], schedule), ClassConditioning)


# ------------------------------------------------------------------------------ where class labels still live
# The count of "the places a family touches": modules naming class-label concepts. Issue 21 put every PyTorch
# path (sample, torchrun sample, inpaint, edit, tune, profile) behind the predictor protocol, so the step loop, the
# solver ops and the text-to-image adapters name no class concept, and a diffusers family is its adapter + registry
# line (the test above). It did NOT shrink this list: on main before the protocol 28 modules matched, now 30 (the
# protocol's ClassConditioning and the SiT adapter were added; nothing left). The rest are class-conditional by
# nature (SiT models, trainers, datasets, bundles, class metrics), SiT export and its backends (class ids as graph
# inputs), or the runtime commands' class paths kept beside their prompt paths (--classes, class-named files, the
# requests cycled when none are given, the velocity-norm rule, eval). docs/predictor_protocol.md says the same.
# Pinned so the list only shrinks on purpose.
CLASS_CONCEPTS = ("num_classes", "class_names", "null_label", "null class", "check_labels", "label_drop",
                  "ClassConditioning")
CLASS_MODULES = {
    # the protocol and the SiT family's adapter
    "flowturbo/families.py", "training/families/sit.py",
    # the SiT family itself: models, bundles, checkpoints, the reference sampler, datasets, trainers, class metrics
    "training/models.py", "training/bundle.py", "training/checkpoints.py", "training/sampling.py",
    "training/image_folder.py", "training/train_cli.py", "training/trainers/data.py", "training/trainers/encoder.py",
    "training/trainers/package.py", "training/trainers/predictor.py", "training/trainers/refiner.py",
    "training/evaluation/__init__.py", "training/evaluation/classifier.py",
    # SiT export graphs take class ids (text exports take prompt embeddings: export/text_export.py)
    "export/modules.py", "export/pipeline.py", "runtime/artifacts.py", "runtime/exported.py",
    "runtime/cpp_backend.py",
    # the runtime commands' class paths (--classes, file names, cycled requests) and TorchPipeline.num_classes
    "runtime/cli.py", "runtime/edit_cli.py", "runtime/editing.py", "runtime/images.py", "runtime/profile_cli.py",
    "runtime/profiling.py", "runtime/pytorch_backend.py", "runtime/sampler.py", "runtime/sharded_cli.py",
    "runtime/tune.py",
}
PROTOCOL_ONLY = ("flowturbo/integrator.py", "kernels/solver.py", "training/families/flow_match.py",
                 "training/families/sd3.py", "training/families/flux.py", "training/families/__init__.py",
                 "runtime/text_cli.py", "runtime/results.py")


def test_where_class_label_concepts_live_is_pinned():
    naming = _modules_naming(CLASS_CONCEPTS)
    assert naming == CLASS_MODULES, (f"new: {sorted(naming - CLASS_MODULES)} (route them through the family, "
                                     f"flowturbo.families, or pin them here with the reason); "
                                     f"gone: {sorted(CLASS_MODULES - naming)} (remove them from the list)")
    assert not naming & set(PROTOCOL_ONLY)
