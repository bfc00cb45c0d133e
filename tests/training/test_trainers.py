"""Trainers end to end on tiny configs (CPU, a few steps): autoencoder, predictor, refiner, package, CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.autoencoder import FlowTurboAutoencoderDecoder
from flowturbo.training.bundle import load_bundle
from flowturbo.training.models import SiT, perturb_zero_initialized, sit_config
from flowturbo.training.train_cli import main as cli_main
from flowturbo.training.trainers import (
    AUTOENCODER_TRAIN_PRESETS,
    PREDICTOR_TRAIN_PRESETS,
    REFINER_TRAIN_PRESETS,
    AutoencoderTrainConfig,
    ImageDataConfig,
    LatentDataConfig,
    PredictorTrainConfig,
    RefinerTrainConfig,
    load_autoencoder,
    package_bundle,
    train_autoencoder,
    train_predictor,
    train_refiner,
)
from flowturbo.training.trainers.common import latest_checkpoint, load_checkpoint_state
from flowturbo.training.trainers.data import LATENT_CACHE_FILE, load_images, unflipped_tensors
from flowturbo.training.trainers.predictor import flow_matching_loss, read_trained_predictor
from flowturbo.training.trainers.refiner import refiner_loss

CLASSES = ("bag", "coat", "shoe")
PER_CLASS = 8
IMAGE_SIZE = 16  # tiny autoencoder: 16x16x1 -> 4x8x8 latents
LATENT_SHAPE = (4, 8, 8)


def _make_folder(root: Path, channels: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            shape = (IMAGE_SIZE + i, IMAGE_SIZE + 2) + ((3,) if channels == 3 else ())
            base = rng.integers(0, 120, shape, dtype=np.uint8) + np.uint8(40 * c)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(base).save(root / name / f"{i}.png")
    return root


def _images(root: Path, channels: int = 1, flip: bool = False) -> ImageDataConfig:
    return ImageDataConfig(dataset=str(root), image_size=IMAGE_SIZE, image_channels=channels, random_flip=flip)


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("gray"), 1, seed=0)


@pytest.fixture(scope="module")
def ae_run(gray_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = AutoencoderTrainConfig(**{**AUTOENCODER_TRAIN_PRESETS["tiny"], "data": _images(gray_folder, flip=True)})
    return train_autoencoder(config, tmp_path_factory.mktemp("ae") / "run", log=lambda _m: None)


@pytest.fixture(scope="module")
def pred_run(gray_folder: Path, ae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    preset = PREDICTOR_TRAIN_PRESETS["tiny"]
    config = PredictorTrainConfig(**{**preset, "data": LatentDataConfig(images=_images(gray_folder),
                                                                         autoencoder=str(ae_run))})
    return train_predictor(config, tmp_path_factory.mktemp("pred") / "run", log=lambda _m: None)


def _official_teacher(path: Path, preset: str = "SiT-T/2", num_classes: int = len(CLASSES),
                      input_size: int = LATENT_SHAPE[1]) -> Path:
    """A raw SiT state dict saved like the official SiT-XL-2-256x256.pt (learn_sigma, null class row)."""
    torch.manual_seed(11)
    model = SiT(sit_config(preset, input_size=input_size, in_channels=4, num_classes=num_classes))
    perturb_zero_initialized(model, generator=torch.Generator().manual_seed(12))
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------ autoencoder
def test_autoencoder_trainer_writes_both_decoder_variants_and_latent_scale(ae_run: Path, gray_folder: Path) -> None:
    model, variants = load_autoencoder(ae_run)
    assert set(variants) == {"mse"}
    assert model.config.latent_scale != 1.0
    ema_decoder = model.decoder.state_dict()
    assert any(not torch.equal(ema_decoder[k], variants["mse"][k]) for k in ema_decoder)  # fine-tuned further
    for stage in ("autoencoder", "decoder_mse"):
        state = load_checkpoint_state(latest_checkpoint(ae_run / stage))
        assert all(np.isfinite(state["losses"]))
    # The latent scale normalises the unflipped training images' latents to unit std.
    images, _ = unflipped_tensors(load_images(_images(gray_folder, flip=True)))
    n = AUTOENCODER_TRAIN_PRESETS["tiny"]["latent_scale_images"]
    latents = model.encode_latents(images[:n])
    assert latents.shape[1:] == LATENT_SHAPE
    torch.testing.assert_close(latents.std(unbiased=False), torch.tensor(1.0), **tol(torch.float32))
    saved = json.loads((ae_run / "autoencoder_config.json").read_text())
    assert saved["latent_scale"] == model.config.latent_scale


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_source_pads_to_32_and_flips_deterministically(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (13, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(13) % 10)
    config = ImageDataConfig(split="test", fashion_mnist_root=str(tmp_path), limit=11, random_flip=True)
    source = load_images(config, seed=2)
    assert len(source) == 11 and source.num_classes == 10 and source.class_names[0] == "T-shirt/top"
    plain, labels = unflipped_tensors(source)
    assert plain.shape == (11, 1, 32, 32) and labels.tolist() == list(range(10)) + [0]
    assert (plain[:, :, :2] == -1).all() and float(plain[0, 0, 2, 2]) == pytest.approx(images[0, 0, 0] / 127.5 - 1)
    source.dataset.set_epoch(3)
    flipped = [i for i in range(11) if not torch.equal(source.dataset[i][0], plain[i])]
    assert flipped and len(flipped) < 11
    assert all(torch.equal(source.dataset[i][0], plain[i].flip(-1)) for i in flipped)


# --------------------------------------------------------------------------------------------- losses
class _Recorder(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, *args):
        self.calls.append([a.clone() for a in args])
        return self.fn(*args)


def test_flow_matching_loss_uses_the_linear_path() -> None:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 2, 4, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    out = torch.randn(5, 4, 4, 4, generator=g)  # learn_sigma-style: 2C channels, only the first C count
    model = _Recorder(lambda x, t, y: out)
    torch.manual_seed(3)
    loss = flow_matching_loss(model, x1, labels, channels=2)
    torch.manual_seed(3)
    x0, t = torch.randn_like(x1), torch.rand(5)
    (x_t, t_seen, y_seen), = model.calls
    torch.testing.assert_close(t_seen, t, **tol(torch.float32))
    torch.testing.assert_close(x_t, t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, **tol(torch.float32))
    assert torch.equal(y_seen, labels)
    torch.testing.assert_close(loss, ((out[:, :2] - (x1 - x0)) ** 2).mean(), **tol(torch.float32))


def test_refiner_loss_is_the_flowturbo_objective() -> None:
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(64, 2, 3, 3, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    teacher = _Recorder(lambda x, t, y: x * (1 + t.view(-1, 1, 1, 1)) + 0.1 * y.view(-1, 1, 1, 1))
    teacher.velocity = teacher.forward  # type: ignore[method-assign]
    refiner = _Recorder(lambda x, t, y, v: 0.5 * v - 0.2 * x)
    max_dt = 0.6  # large, so that t + dt > 1 happens and the clamp is exercised
    torch.manual_seed(4)
    loss = refiner_loss(refiner, teacher, x1, labels, max_dt)
    (x_t, t, y1), (x_next, t_next, y2) = teacher.calls
    ((rx, rt, ry, rv),) = refiner.calls
    v_t = x_t * (1 + t.view(-1, 1, 1, 1)) + 0.1 * labels.view(-1, 1, 1, 1)
    dt = ((x_next - x_t) / v_t).flatten(1).mean(1)  # x' = x_t + dt * v_t
    torch.testing.assert_close(x_next, x_t + dt.view(-1, 1, 1, 1) * v_t, **tol("model_fp32"))
    assert (dt > 0).all() and (dt <= max_dt + 1e-5).all()
    torch.testing.assert_close(t_next, (t + dt).clamp(max=1.0), **tol("model_fp32"))
    assert (t_next == 1.0).any() and (t + dt > 1.0).any()
    assert torch.equal(y1, labels) and torch.equal(y2, labels) and torch.equal(ry, labels)  # same labels
    assert torch.equal(rx, x_next) and torch.equal(rt, t_next) and torch.equal(rv, v_t)
    target = x_next * (1 + t_next.view(-1, 1, 1, 1)) + 0.1 * labels.view(-1, 1, 1, 1)
    prediction = v_t + 0.5 * v_t - 0.2 * x_next
    torch.testing.assert_close(loss, ((prediction - target) ** 2).mean(), **tol("model_fp32"))


# ------------------------------------------------------------------------------------------- predictor
def test_predictor_trainer_learns_on_pre_encoded_latents(pred_run: Path) -> None:
    weights, config, names = read_trained_predictor(pred_run)
    assert (config.input_size, config.in_channels, config.num_classes) == (8, 4, len(CLASSES))
    assert names == list(CLASSES) and config.null_class == len(CLASSES)
    state = load_checkpoint_state(latest_checkpoint(pred_run))
    for key, value in weights.items():  # the exported weights are the EMA weights
        assert torch.equal(value, state["ema"][key])
    assert all(np.isfinite(state["losses"])) and len(state["losses"]) == PREDICTOR_TRAIN_PRESETS["tiny"]["loop"].steps
    cache = torch.load(pred_run / LATENT_CACHE_FILE, weights_only=True)
    assert cache["latents"].shape == (len(CLASSES) * PER_CLASS, *LATENT_SHAPE)
    assert torch.equal(cache["labels"].bincount(), torch.full((3,), PER_CLASS))


# --------------------------------------------------------------------------------------------- refiner
def test_refiner_resume_is_exact_with_an_official_style_teacher(gray_folder: Path, ae_run: Path,
                                                                 tmp_path: Path) -> None:
    teacher = _official_teacher(tmp_path / "SiT-T-2.pt")
    preset = REFINER_TRAIN_PRESETS["tiny"]
    data = LatentDataConfig(images=_images(gray_folder, flip=True), autoencoder=str(ae_run))
    full_cfg = RefinerTrainConfig(**{**preset, "teacher": str(teacher), "teacher_model": "SiT-T/2", "data": data})
    short_cfg = dataclasses.replace(full_cfg, loop=dataclasses.replace(full_cfg.loop, steps=2))
    quiet = dict(log=lambda _m: None)
    full = train_refiner(full_cfg, tmp_path / "full", **quiet)
    train_refiner(short_cfg, tmp_path / "split", **quiet)
    train_refiner(full_cfg, tmp_path / "split", resume=True, **quiet)
    a = load_checkpoint_state(latest_checkpoint(full))
    b = load_checkpoint_state(latest_checkpoint(tmp_path / "split"))
    assert len(a["losses"]) == full_cfg.loop.steps and a["losses"] == b["losses"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert a["extra"]["refiner_config"]["hidden_size"] == 192
    assert (full / "refiner.safetensors").is_file()
    # Pre-encoding with random_flip stores every image and its mirror image once.
    cache = torch.load(full / LATENT_CACHE_FILE, weights_only=True)
    n = len(CLASSES) * PER_CLASS
    assert cache["latents"].shape == (2 * n, *LATENT_SHAPE) and torch.equal(cache["labels"][:n], cache["labels"][n:])
    model, _ = load_autoencoder(ae_run)
    images, _ = unflipped_tensors(load_images(_images(gray_folder, flip=True)))
    torch.testing.assert_close(cache["latents"][n:], model.encode_latents(images.flip(-1)), **tol("model_fp32"))


def test_refiner_refuses_a_teacher_that_does_not_fit(gray_folder: Path, ae_run: Path, tmp_path: Path) -> None:
    data = LatentDataConfig(images=_images(gray_folder), autoencoder=str(ae_run))
    base = RefinerTrainConfig(**{**REFINER_TRAIN_PRESETS["tiny"], "teacher": "x", "data": data})
    teacher = _official_teacher(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"not SiT-M/2: hidden_size 192 \(expected 256\)"):
        train_refiner(dataclasses.replace(base, teacher=str(teacher), teacher_model="SiT-M/2"), tmp_path / "a")
    wrong_classes = _official_teacher(tmp_path / "c.pt", num_classes=5)
    with pytest.raises(FlowTurboError, match="5 classes but the data has 3"):
        train_refiner(dataclasses.replace(base, teacher=str(wrong_classes)), tmp_path / "b")
    wrong_size = _official_teacher(tmp_path / "s.pt", input_size=4)
    with pytest.raises(FlowTurboError, match=r"\(4, 4, 4\) latents but the data encodes to \(4, 8, 8\)"):
        train_refiner(dataclasses.replace(base, teacher=str(wrong_size)), tmp_path / "c")
    with pytest.raises(CheckpointError, match="does not exist"):
        train_refiner(dataclasses.replace(base, teacher=str(tmp_path / "missing.pt")), tmp_path / "d")


def test_refiner_on_an_rgb_folder_with_a_diffusers_vae_encoding_on_the_fly(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=IMAGE_SIZE)
    vae.save_pretrained(tmp_path / "vae")
    rgb = _make_folder(tmp_path / "rgb", 3, seed=1)
    teacher = _official_teacher(tmp_path / "teacher.pt")
    data = LatentDataConfig(images=_images(rgb, channels=3, flip=True), vae=str(tmp_path / "vae"), pre_encode=False)
    config = RefinerTrainConfig(**{**REFINER_TRAIN_PRESETS["tiny"], "teacher": str(teacher), "data": data})
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, steps=2))
    out = train_refiner(config, tmp_path / "run", log=lambda _m: None)
    state = load_checkpoint_state(latest_checkpoint(out))
    assert len(state["losses"]) == 2 and all(np.isfinite(state["losses"]))
    assert not (out / LATENT_CACHE_FILE).exists()  # streamed, not pre-encoded
    gray = dataclasses.replace(data, images=_images(rgb, channels=1))
    with pytest.raises(FlowTurboError, match="--image-channels 3"):
        train_refiner(dataclasses.replace(config, data=gray), tmp_path / "gray")


# --------------------------------------------------------------------------------------- package + CLI
def test_package_assembles_a_loadable_bundle_from_ema_weights(pred_run: Path, ae_run: Path, tmp_path: Path) -> None:
    refiner_run = tmp_path / "refiner"
    cfg = RefinerTrainConfig(**{**REFINER_TRAIN_PRESETS["tiny"], "teacher": str(pred_run),
                                "data": saved_data_config(pred_run)})
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, steps=1))
    train_refiner(cfg, refiner_run, log=lambda _m: None)
    bundle = package_bundle(tmp_path / "bundle", predictor=pred_run, refiner=refiner_run, autoencoder=ae_run,
                            variant="mse")
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.class_names == list(CLASSES) and loaded.defaults.schedule == "H1P5R3"
    assert isinstance(loaded.decoder, FlowTurboAutoencoderDecoder)
    assert loaded.decoder.variant == "mse" and loaded.decoder.available_variants == ("ema", "mse")
    weights, _, _ = read_trained_predictor(pred_run)
    for key, value in loaded.predictor.state_dict().items():
        assert torch.equal(value, weights[key])
    latents = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.decoder.decode(latents), bundle.decoder.decode(latents), **tol(torch.float32))
    assert loaded.decoder.decode(latents).shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    # Every package includes the autoencoder's encoder (inpainting / editing start from a user's image).
    from flowturbo.training.encoders import FlowTurboAutoencoderEncoder

    assert isinstance(loaded.encoder, FlowTurboAutoencoderEncoder)
    images = loaded.decoder.decode(latents)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder.encode(images), bundle.encoder.encode(images), **tol(torch.float32))
        assert loaded.encoder.encode(images).shape == (2, *LATENT_SHAPE)


def test_package_from_official_checkpoints_keeps_their_guidance_channels(ae_run: Path, pred_run: Path,
                                                                         tmp_path: Path) -> None:
    """Issue 19: `train package` from official SiT checkpoints wrote guidance_channels null, so the bundle, its
    exports and the C++ runner guided all 4 latent channels where `sample --predictor` guides 3. The family's
    defaults travel into the bundle and from there into every export; --guidance-channels still overrides."""
    from flowturbo.export.pipeline import ExportRequest, export_bundle
    from flowturbo.runtime.artifacts import load_artifacts
    from flowturbo.training.bundle import OFFICIAL_GUIDANCE_CHANNELS

    teacher = _official_teacher(tmp_path / "SiT-T-2.pt")
    package_bundle(tmp_path / "official", predictor=teacher, autoencoder=ae_run)
    bundle = load_bundle(tmp_path / "official")
    assert bundle.defaults.guidance_channels == OFFICIAL_GUIDANCE_CHANNELS == 3
    schedule = bundle.defaults.sampling_schedule()
    result = export_bundle(bundle, ExportRequest(schedule, "1:1:2", ("onnx",), validate=False), tmp_path / "art",
                           progress=False)
    assert schedule.guidance_channels == 3 and load_artifacts(result.path).schedule.guidance_channels == 3
    package_bundle(tmp_path / "all", predictor=teacher, autoencoder=ae_run, guidance_channels=4)
    assert load_bundle(tmp_path / "all").defaults.guidance_channels == 4
    package_bundle(tmp_path / "ours", predictor=pred_run, autoencoder=ae_run)
    assert load_bundle(tmp_path / "ours").defaults.guidance_channels is None  # our own models guide every channel


def saved_data_config(pred_run: Path) -> LatentDataConfig:
    """The data config a predictor run was trained with (read back from its config.json)."""
    from flowturbo.training.trainers.common import config_from_dict

    saved = json.loads((pred_run / "config.json").read_text())["config"]["data"]
    return config_from_dict(LatentDataConfig, saved)


def test_cli_trains_resumes_refuses_changes_and_packages(pred_run: Path, ae_run: Path, gray_folder: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    common = ["--dataset", str(gray_folder), "--image-size", str(IMAGE_SIZE), "--image-channels", "1",
              "--autoencoder", str(ae_run), "--limit", "16", "--batch-size", "4", "--out", str(out)]
    assert cli_main(["train", "predictor", "--preset", "tiny", "--steps", "1", *common]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["loop"]["steps"] == 1 and saved["data"]["images"]["limit"] == 16 and saved["model"] == "SiT-T/2"
    assert cli_main(["train", "predictor", "--preset", "tiny", "--steps", "1", *common]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["train", "predictor", "--preset", "tiny", "--steps", "2", "--lr", "0.5", "--resume", *common]) == 2
    assert "loop.lr: 0.001 -> 0.5" in capsys.readouterr().err
    assert cli_main(["train", "predictor", "--config", str(out / "config.json"), "--steps", "2", "--resume",
                     *common]) == 0
    assert load_checkpoint_state(latest_checkpoint(out))["step"] == 2
    assert cli_main(["train", "package", "--predictor", str(out), "--autoencoder", str(ae_run),
                     "--schedule", "H4", "--out", str(tmp_path / "bundle")]) == 0
    assert load_bundle(tmp_path / "bundle").defaults.schedule == "H4"
