"""`flowturbo sample --predictor X.pt --refiner R.pt --vae FOLDER`: the official-checkpoint path end to end."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from flowturbo.runtime.cli import main
from flowturbo.runtime.pytorch_backend import OFFICIAL_GUIDANCE_CHANNELS, load_pipeline
from flowturbo.training.models import RefinerConfig, SiT, VelocityRefiner, perturb_zero_initialized, sit_config

TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=16)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    gen = torch.Generator().manual_seed(0)
    config = sit_config("SiT-T/2", input_size=8, in_channels=4, num_classes=7)
    sit = SiT(config)
    perturb_zero_initialized(sit, generator=gen)
    refiner = VelocityRefiner(RefinerConfig.for_predictor(config))
    perturb_zero_initialized(refiner, generator=gen)
    # The official training scripts save {"model", "ema", "opt", "args"}; FlowTurbo's refiner loader reads "model".
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict()}, folder / "SiT-tiny.pt")
    torch.save({"model": refiner.state_dict()}, folder / "refiner.pt")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(folder / "vae"))
    return folder


def test_official_checkpoints_sample(official_files, tmp_path):
    out = tmp_path / "out"
    f = official_files
    code = main(["sample", "--predictor", str(f / "SiT-tiny.pt"), "--refiner", str(f / "refiner.pt"),
                 "--vae", str(f / "vae"), "--schedule", "H1P1R1", "--classes", "0,6", "--cfg", "3",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["schedule"]["guidance_channels"] == OFFICIAL_GUIDANCE_CHANNELS  # official default: 3 of 4
    assert record["model"]["decoder"] == "diffusers-vae" and record["model"]["has_refiner"]
    assert (record["predictor_calls_per_batch"], record["refiner_calls_per_batch"]) == (3, 2)


def test_official_pipeline_needs_vae_and_matching_refiner(official_files, tmp_path):
    from flowturbo.errors import FlowTurboError

    with pytest.raises(FlowTurboError, match="--vae"):
        load_pipeline(predictor=official_files / "SiT-tiny.pt")
    with pytest.raises(FlowTurboError, match="not both"):
        load_pipeline(tmp_path, predictor=official_files / "SiT-tiny.pt")
    other = sit_config("SiT-T/2", input_size=8, in_channels=4, num_classes=9)
    torch.save({"model": VelocityRefiner(RefinerConfig.for_predictor(other)).state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(FlowTurboError):
        load_pipeline(predictor=official_files / "SiT-tiny.pt", refiner=tmp_path / "bad.pt",
                      vae=official_files / "vae")


def test_checkpoint_entry_follows_the_released_code_per_file_kind(tmp_path):
    """Predictor files default to "ema" (SiT's find_model), refiner files to "model" (FlowTurbo's sampler);
    --checkpoint-entry overrides both."""
    gen = torch.Generator().manual_seed(3)
    config = sit_config("SiT-T/2", input_size=8, in_channels=4, num_classes=7)
    models = {}
    for entry in ("model", "ema"):
        sit = SiT(config)
        perturb_zero_initialized(sit, generator=gen)
        ref = VelocityRefiner(RefinerConfig.for_predictor(config))
        perturb_zero_initialized(ref, generator=gen)
        models[entry] = (sit, ref)
    torch.save({entry: models[entry][0].state_dict() for entry in models}, tmp_path / "sit.pt")
    torch.save({entry: models[entry][1].state_dict() for entry in models}, tmp_path / "ref.pt")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(tmp_path / "vae"))

    def weights(pipe):
        return (pipe.predictor.final_layer.linear.bias.clone(), pipe.refiner.final_layer.linear.bias.clone())

    files = dict(predictor=tmp_path / "sit.pt", refiner=tmp_path / "ref.pt", vae=tmp_path / "vae", device="cpu")
    default = load_pipeline(**files)
    assert default.checkpoint_entries == {"predictor": "ema", "refiner": "model"}
    assert torch.equal(weights(default)[0], models["ema"][0].final_layer.linear.bias)
    assert torch.equal(weights(default)[1], models["model"][1].final_layer.linear.bias)
    forced = load_pipeline(**files, checkpoint_entry="ema")
    assert torch.equal(weights(forced)[1], models["ema"][1].final_layer.linear.bias)
    assert forced.describe()["checkpoint_entries"] == {"predictor": "ema", "refiner": "ema"}
    from flowturbo.errors import FlowTurboError

    with pytest.raises(FlowTurboError, match="--checkpoint-entry must be one of"):
        load_pipeline(**files, checkpoint_entry="opt")
    with pytest.raises(FlowTurboError, match="applies to official checkpoint files"):
        load_pipeline(None, checkpoint_entry="ema")
