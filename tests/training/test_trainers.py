"""Trainers end to end on tiny configs (CPU, a few steps): autoencoder, predictor, refiner, package, CLI."""

from __future__ import annotations

import argparse
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
from flowturbo.refiner_dt import DtDistribution
from flowturbo.training.trainers.refiner import (
    TeacherCacheConfig,
    TeacherSampleBatches,
    TeacherSamples,
    draw_dt,
    read_trained_refiner,
    refiner_loss,
)

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
    max_dt = 0.6  # long steps: under t ~ U(0, 1), t + dt > 1 would be common
    torch.manual_seed(4)
    loss = refiner_loss(refiner, teacher, x1, labels, DtDistribution(max_dt=max_dt))
    (x_t, t, y1), (x_next, t_next, y2) = teacher.calls
    ((rx, rt, ry, rv),) = refiner.calls  # a refiner without dt conditioning is called without dt
    v_t = x_t * (1 + t.view(-1, 1, 1, 1)) + 0.1 * labels.view(-1, 1, 1, 1)
    dt = ((x_next - x_t) / v_t).flatten(1).mean(1)  # x' = x_t + dt * v_t
    torch.testing.assert_close(x_next, x_t + dt.view(-1, 1, 1, 1) * v_t, **tol("model_fp32"))
    assert (dt > 0).all() and (dt <= max_dt + 1e-5).all()
    torch.testing.assert_close(t_next, t + dt, **tol("model_fp32"))  # queried at t + dt: no clamping
    assert (t_next <= 1.0).all() and (t >= 0).all()  # t ~ U(0, 1 - dt)
    assert (t / (1 - dt)).max() > 0.9 and (t / (1 - dt)).min() < 0.1  # ... across all of it
    assert torch.equal(y1, labels) and torch.equal(y2, labels) and torch.equal(ry, labels)  # same labels
    assert torch.equal(rx, x_next) and torch.equal(rt, t_next) and torch.equal(rv, v_t)
    target = x_next * (1 + t_next.view(-1, 1, 1, 1)) + 0.1 * labels.view(-1, 1, 1, 1)
    prediction = v_t + 0.5 * v_t - 0.2 * x_next
    torch.testing.assert_close(loss, ((prediction - target) ** 2).mean(), **tol("model_fp32"))


def test_a_dt_conditioned_refiner_is_trained_on_the_age_of_v_t() -> None:
    """The dt a dt-refiner gets in training is the one x' = x_t + dt v_t was made with: the age of v_t at t + dt,
    exactly what the sampler passes (flowturbo.integrator)."""
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(32, 2, 3, 3, generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    teacher = _Recorder(lambda x, t, y: torch.sin(x) * (1 + t.view(-1, 1, 1, 1)))
    teacher.velocity = teacher.forward  # type: ignore[method-assign]
    refiner = _Recorder(lambda x, t, y, v, dt: dt.view(-1, 1, 1, 1) * v)
    refiner.takes_dt = True
    torch.manual_seed(5)
    loss = refiner_loss(refiner, teacher, x1, labels, DtDistribution(max_dt=0.5, zero_share=0.25))
    (x_t, t, _), (x_next, t_next, _) = teacher.calls
    ((rx, rt, _, rv, rdt),) = refiner.calls
    torch.testing.assert_close(x_next, x_t + rdt.view(-1, 1, 1, 1) * rv, **tol("model_fp32"))
    torch.testing.assert_close(rt, t + rdt, **tol("model_fp32"))
    assert (rdt == 0).any() and torch.equal(rx[rdt == 0], x_t[rdt == 0])  # dt = 0: x' = x_t, target = v_t
    target = torch.sin(x_next) * (1 + t_next.view(-1, 1, 1, 1))
    torch.testing.assert_close(loss, ((rv + rdt.view(-1, 1, 1, 1) * rv - target) ** 2).mean(), **tol("model_fp32"))


def test_dt_distribution_mixture_and_validation() -> None:
    dist = DtDistribution(max_dt=0.5, small_share=0.3, small_max=0.1, zero_share=0.05)
    torch.manual_seed(0)
    dt = draw_dt(200_000, dist, "cpu")
    assert float(dt.min()) == 0.0 and float(dt.max()) <= 0.5
    assert abs(float((dt == 0).float().mean()) - 0.05) < 0.005
    assert abs(float((dt <= 0.1).float().mean()) - (0.05 + 0.3 + 0.65 * 0.2)) < 0.01  # shares of the mixture
    assert dist.describe() == "dt ~ 0 (p 0.05) | U(0, 0.1] (p 0.3) | U(0, 0.5]"
    assert DtDistribution.from_dict(dist.to_dict()) == dist
    for bad, message in [(dict(max_dt=0.0), r"max_dt \(--max-dt\) must be in \(0, 1\]"),
                         (dict(small_share=0.3, small_max=0.2), r"small_max \(--dt-small-max\) must be in"),
                         (dict(small_share=0.8, zero_share=0.3), "small_share \\+ zero_share must be <= 1"),
                         (dict(zero_share=-0.1), "zero_share must be in")]:
        with pytest.raises(FlowTurboError, match=message):
            DtDistribution(**bad)
    assert DtDistribution(max_dt=0.03).small_max == 0.05  # small_max only matters with a small share
    with pytest.raises(FlowTurboError, match="unknown keys"):
        DtDistribution.from_dict({"max_dt": 0.5, "mean": 1})
    with pytest.raises(FlowTurboError, match="--teacher-cache-batches N"):
        TeacherCacheConfig(batches=0, reuse=2)


class _CountingSamples:
    """make() for TeacherSampleBatches: 'teacher samples' that remember which data rows they came from."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        x1, labels = batch
        n = x1.shape[0]
        return TeacherSamples(x1, torch.rand(n), torch.rand(n), -x1, 2 * x1, labels)


def _batches(data, cache, make):
    from flowturbo.training.trainers.common import DistContext, TensorBatches

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    source = TensorBatches(data, 4, ctx, seed=3)
    return TeacherSampleBatches(source, make, cache, torch.device("cpu"))


def test_teacher_cache_reuses_every_sample_and_resumes_exactly() -> None:
    rows = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1) * torch.ones(40, 2, 3, 3)
    data = (rows, torch.arange(40) % 3)
    make = _CountingSamples()
    batches = _batches(data, TeacherCacheConfig(batches=5, reuse=3), make)
    torch.manual_seed(1)
    drawn = [batches.next_batch() for _ in range(13)]
    assert make.calls == 5 + 4  # the pool, then one batch recomputed every 3 steps (steps 4, 7, 10, 13)
    for x_next, _t, _dt, v_t, target, _labels in drawn:
        ids = x_next[:, 0, 0, 0]
        assert ids.unique().numel() == 4  # drawn from the pool without repeats
        assert torch.equal(v_t, -x_next) and torch.equal(target, 2 * x_next)  # rows stay whole
    state = batches.state_dict()
    rng = torch.get_rng_state()
    after = [batches.next_batch() for _ in range(4)]
    again = _batches(data, TeacherCacheConfig(batches=5, reuse=3), _CountingSamples())
    again.load_state_dict(state)
    torch.set_rng_state(rng)
    assert all(all(torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(after, [again.next_batch() for _ in range(4)]))
    fresh = _CountingSamples()
    no_cache = _batches(data, TeacherCacheConfig(), fresh)
    [no_cache.next_batch() for _ in range(6)]
    assert fresh.calls == 6  # no cache: every step its own teacher batch


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


def test_dt_refiner_with_a_teacher_cache_resumes_exactly_and_records_its_range(pred_run: Path, ae_run: Path,
                                                                             tmp_path: Path) -> None:
    """A dt-conditioned refiner trained from a pool of teacher samples: a split run (resumed mid-way, the pool inside
    the checkpoint) equals the straight run; the weights file records the dt distribution and ``train package``
    carries it into the bundle's config.json."""
    dist = DtDistribution(max_dt=0.5, small_share=0.3, small_max=0.1, zero_share=0.1)
    base = RefinerTrainConfig(**{**REFINER_TRAIN_PRESETS["tiny"], "teacher": str(pred_run),
                                 "data": saved_data_config(pred_run), "dt": dist, "dt_conditioning": True,
                                 "cache": TeacherCacheConfig(batches=3, reuse=2)})
    full_cfg = dataclasses.replace(base, loop=dataclasses.replace(base.loop, steps=5, ckpt_every=5))
    short_cfg = dataclasses.replace(full_cfg, loop=dataclasses.replace(full_cfg.loop, steps=3))
    quiet = dict(log=lambda _m: None)
    full = train_refiner(full_cfg, tmp_path / "full", **quiet)
    train_refiner(short_cfg, tmp_path / "split", **quiet)
    assert load_checkpoint_state(latest_checkpoint(tmp_path / "split"))["data"]["pool"] is not None
    train_refiner(full_cfg, tmp_path / "split", resume=True, **quiet)
    a = load_checkpoint_state(latest_checkpoint(full))
    b = load_checkpoint_state(latest_checkpoint(tmp_path / "split"))
    assert len(a["losses"]) == 5 and a["losses"] == b["losses"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    trained = read_trained_refiner(full)
    assert trained.config.dt_conditioning and trained.dt == dist
    assert any(k.startswith("dt_embedder.") for k in trained.state)
    bundle = package_bundle(tmp_path / "bundle", predictor=pred_run, refiner=full, autoencoder=ae_run)
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["refiner"]["dt_conditioning"] is True and config["refiner_dt"] == dist.to_dict()
    assert load_bundle(tmp_path / "bundle").refiner_dt == dist == bundle.refiner_dt
    # A new refiner around an existing bundle's decoder, encoder and class names (e.g. the embedded default's).
    again = package_bundle(tmp_path / "again", predictor=pred_run, refiner=full, decoder_bundle=tmp_path / "bundle",
                           variant="mse")
    latents = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again.decoder.decode(latents), bundle.decoder.select_variant("mse").decode(latents))
    assert again.class_names == bundle.class_names and again.encoder is not None and again.refiner_dt == dist
    # Starting a dt refiner from a refiner without dt is exact (its dt embedding starts at zero output) ...
    plain = tmp_path / "plain"
    train_refiner(dataclasses.replace(base, dt_conditioning=False, cache=TeacherCacheConfig(),
                                      loop=dataclasses.replace(base.loop, steps=1)), plain, **quiet)
    from flowturbo.training.models import RefinerConfig, VelocityRefiner
    from flowturbo.training.trainers.refiner import initial_refiner

    started = initial_refiner(dataclasses.replace(base, init_from=str(plain)), trained.config).eval()
    official = VelocityRefiner(read_trained_refiner(plain).config)
    official.load_state_dict(read_trained_refiner(plain).state)
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([0.2, 0.7]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(started(x, t, y, x, torch.tensor([0.0, 0.4])), official.eval()(x, t, y, x))
    # ... the reverse is refused, naming the flag.
    with pytest.raises(CheckpointError, match="train with --dt-conditioning"):
        initial_refiner(dataclasses.replace(base, init_from=str(full)), RefinerConfig.from_dict(
            {**trained.config.to_dict(), "dt_conditioning": False}))


def test_refiner_cli_dt_flags_are_validated_together(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The dt flags of one dataclass are applied together (a preset's small_max above a new --max-dt is not an
    error when --dt-small-max comes with it); bad values are one error line, exit 2, before any data is read."""
    from flowturbo.training.train_cli import (
        REFINER_CACHE_OPTIONS,
        REFINER_DT_OPTIONS,
        REFINER_OPTIONS,
        _add_options,
        build_config,
    )

    parser = argparse.ArgumentParser()
    options = REFINER_OPTIONS + REFINER_DT_OPTIONS + REFINER_CACHE_OPTIONS
    _add_options(parser, "refiner", options)
    parser.add_argument("--preset", default="fashion-mnist-dt")
    args = parser.parse_args(["--teacher", "t.pt", "--max-dt", "0.08", "--dt-small-max", "0.02",
                              "--no-dt-conditioning", "--teacher-reuse", "2"])
    config = build_config(RefinerTrainConfig, REFINER_TRAIN_PRESETS, args, options)
    assert (config.dt.max_dt, config.dt.small_max, config.dt.small_share) == (0.08, 0.02, 0.3)
    assert config.dt_conditioning is False and config.cache == TeacherCacheConfig(batches=32, reuse=2)
    for flags, message in [(["--max-dt", "1.5"], "--max-dt must be a finite number in (0, 1], got '1.5'"),
                           (["--teacher-cache-batches", "0", "--teacher-reuse", "3"], "--teacher-cache-batches N"),
                           (["--dt-small-share", "0.9", "--dt-zero-share", "0.2"], "small_share + zero_share")]:
        code = cli_main(["train", "refiner", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "r"),
                         *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("error:") == 1
    assert not (tmp_path / "r").exists()


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
    # A bundle's predictor file has no metadata of its own: its bundle says which family it is (as a new refiner
    # is packaged around the embedded default's predictor), for the official bundle and ours alike.
    for source in ("official", "ours"):
        repackaged = tmp_path / f"re-{source}"
        package_bundle(repackaged, predictor=tmp_path / source / "predictor.safetensors", autoencoder=ae_run)
        assert load_bundle(repackaged).defaults.guidance_channels == load_bundle(tmp_path / source).defaults.guidance_channels


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
    # --resume alone continues with the run's own settings (no preset, no flags repeated): before, the default
    # preset was taken and the run refused as changed
    assert cli_main(["train", "predictor", "--resume", "--steps", "3", "--out", str(out)]) == 0
    assert load_checkpoint_state(latest_checkpoint(out))["step"] == 3
    assert json.loads((out / "config.json").read_text())["config"]["data"]["images"]["limit"] == 16
    assert cli_main(["train", "package", "--predictor", str(out), "--autoencoder", str(ae_run),
                     "--schedule", "H4", "--out", str(tmp_path / "bundle")]) == 0
    assert load_bundle(tmp_path / "bundle").defaults.schedule == "H4"
