"""Issue 19's "also found" classes, one test each: every one ends in one clear `error:` line (exit 2) before the
work it protects, or in a correct result, with nothing lost and nothing left behind.

Tracebacks (an image above Pillow's decompression-bomb limit, a corrupt or odd-sized PNG in `eval --samples`,
disk full while `sample` writes, `tune --budget-ms inf`), SIGTERM and torchrun leaving no staging folder or lock,
and the silent surprises (`--classes 0,1,2 --num-images 2`, `tune --heun 3:1`, an RGBA mask drawn in its alpha
channel, `edit --strength 1e-17`, two numbers for one sample-count rule). A depth-1 micro bundle serves the CLI
cases; the embedded default model the image-task ones.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowturbo import fileio
from flowturbo.errors import FlowTurboError
from flowturbo.imageio import open_image
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.cli import main
from flowturbo.runtime.editing import load_mask
from cli_checks import one_error_line as one_error
from micro_models import save_tiny_bundle

DEFAULT_MODEL_IMAGE = 32  # the embedded default's images: 32x32 gray


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("hostile") / "micro", seed=7)


@pytest.fixture(scope="module")
def samples(bundle_dir, tmp_path_factory) -> Path:
    """A `flowturbo sample` folder of 4 micro images (6x6 RGB)."""
    out = tmp_path_factory.mktemp("hostile_samples") / "s"
    assert main(["sample", "--model", str(bundle_dir), "--num-images", "4", "--no-progress", "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: the command must refuse before that."""
    from flowturbo.runtime import backends, pytorch_backend
    from flowturbo.runtime.sampler import Sampler

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(Sampler, "from_bundle", load)
    monkeypatch.setattr(backends, "load_exported_sampler", load)
    monkeypatch.setattr(pytorch_backend, "load_pipeline", load)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels (a few bytes on disk, never decodable)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def gray_png(path: Path, size: int = DEFAULT_MODEL_IMAGE, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(10, 245, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("side", [30000, 10000], ids=["above-2x-limit", "above-limit"])
def test_decompression_bombs_are_refused_by_the_one_reader(tmp_path, side):
    """Pillow raises above twice its limit and only warns above it: both are one refusal here."""
    with pytest.raises(FlowTurboError, match=rf"--image .* has {side} x {side} = [\d,]+ pixels, more than Pillow's "
                                             "decompression-bomb limit"):
        open_image(bomb_png(tmp_path / "bomb.png", side, side), "--image")


@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_inpaint_refuses_a_decompression_bomb_before_loading(tmp_path, capsys, no_model, flag):
    files = {"--image": gray_png(tmp_path / "in.png"), "--mask": gray_png(tmp_path / "mask.png", seed=1)}
    files[flag] = bomb_png(tmp_path / "bomb.png", 30000, 30000)
    assert main(["inpaint", "--image", str(files["--image"]), "--mask", str(files["--mask"]), "--classes", "1",
                 "--out", str(tmp_path / "o")]) == 2
    one_error(capsys, f"{flag} {files[flag]} has 30000 x 30000", "give a smaller image")
    assert not (tmp_path / "o").exists()


def _copy_samples(samples: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(samples, tmp_path / "s"))


@pytest.mark.parametrize("damage", ["corrupt", "other-size", "bomb"])
def test_eval_samples_with_a_bad_png_is_one_error_line(samples, tmp_path, capsys, damage):
    folder = _copy_samples(samples, tmp_path)
    victim = sorted(p for p in folder.glob("*.png") if p.name != "grid.png")[1]
    if damage == "corrupt":
        victim.write_bytes(victim.read_bytes()[:20])
        needle = "is not a readable image"
    elif damage == "other-size":
        Image.new("RGB", (7, 6), (90, 30, 200)).save(victim)
        needle = "is 7x6x3 but"
    else:
        bomb_png(victim, 30000, 30000)
        needle = "decompression-bomb limit"
    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR

    assert main(["eval", "--samples", str(folder), "--classifier", str(DEFAULT_BUNDLE_DIR / "classifier"),
                 "--device", "cpu", "--allow-small-sample"]) == 2
    one_error(capsys, f"sample image {victim}", needle)


def test_disk_full_while_sample_writes_keeps_the_previous_output(bundle_dir, tmp_path, capsys, monkeypatch):
    """The staging folder's writes share export's path: ENOSPC is one line, the old output stays, no debris."""
    from flowturbo.runtime import images

    out = tmp_path / "out"
    sample = ["sample", "--model", str(bundle_dir), "--num-images", "3", "--no-progress", "--out", str(out)]
    assert main([*sample, "--seed", "1"]) == 0
    before = (out / "run.json").read_bytes()
    real_png, calls = images._png, []

    def png(array, path, scale=1):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_png(array, path, scale)

    monkeypatch.setattr(images, "_png", png)
    assert main([*sample, "--seed", "2"]) == 2
    one_error(capsys, f"cannot write --out {out}: No space left on device", "keeps its previous content")
    assert (out / "run.json").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_sigterm_unwinds_staging_and_lock(bundle_dir, tmp_path):
    """SIGTERM (a user's kill, torchrun stopping a group) while the output is staged: exit 143, one error line,
    the previous output whole, no staging folder and no lock file left (SIGKILL's debris is test_crash_safety's)."""
    out = tmp_path / "out"
    sample = [sys.executable, "-m", "flowturbo", "sample", "--model", str(bundle_dir), "--num-images", "2",
              "--device", "cpu", "--no-progress", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != fileio.KILL_AT_ENV}
    assert subprocess.run([*sample, "--seed", "1"], env=env, capture_output=True, timeout=300).returncode == 0
    before = (out / "run.json").read_bytes()
    run = subprocess.run([*sample, "--seed", "2"], env={**env, fileio.KILL_AT_ENV: "staged@TERM"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("flowturbo sample: error: stopped by SIGTERM"), run.stderr
    assert (out / "run.json").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow
def test_torchrun_export_runs_on_rank_zero_only(bundle_dir, tmp_path):
    """`torchrun -m flowturbo export` failed with 'another flowturbo process (pid N) is writing DIR', N its own
    other rank, which was stopped and left staging and a lock behind: commands that do not split their work run
    on rank 0 only."""
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flowturbo",
           "export", "--model", str(bundle_dir), "--batch", "1:1:2", "--no-validate", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert "rank 0 runs it alone" in run.stderr and "another flowturbo process" not in run.stderr
    load_artifacts(out)
    assert sorted(os.listdir(tmp_path)) == ["art"]


# ------------------------------------------------------------------------------------------ silent surprises
@pytest.mark.parametrize("command", ["sample", "inpaint", "edit"])
def test_num_images_below_the_classes_given_is_refused_not_dropped(bundle_dir, tmp_path, capsys, no_model, command):
    extra = {"sample": [], "edit": ["--image", str(gray_png(tmp_path / "in.png")), "--strength", "0.5"],
             "inpaint": ["--image", str(gray_png(tmp_path / "in.png")), "--mask", str(gray_png(tmp_path / "m.png"))]}
    assert main([command, *extra[command], "--classes", "0,1,2", "--num-images", "2", "--out",
                 str(tmp_path / "o")]) == 2
    one_error(capsys, "--num-images 2 leaves class 2 of --classes 0,1,2 without an image",
              "pass --num-images 3 or more")


def test_tune_reversed_range_is_refused_before_loading(tmp_path, capsys, no_model):
    assert main(["tune", "--budget-ms", "20", "--heun", "3:1", "--out", str(tmp_path / "t")]) == 2
    one_error(capsys, "--heun 3:1 is a reversed range", "write 1:3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-3", "0"])
def test_tune_budget_must_be_a_finite_positive_number(tmp_path, capsys, no_model, value):
    """`tune --budget-ms inf` ended in a traceback after the whole search."""
    assert main(["tune", "--budget-ms", value, "--out", str(tmp_path / "t")]) == 2
    one_error(capsys, f"--budget-ms must be a finite number > 0, got '{value}'")


def _rgba(path: Path, colour: np.ndarray, alpha: np.ndarray) -> Path:
    Image.fromarray(np.dstack([colour, colour, colour, alpha]).astype(np.uint8), mode="RGBA").save(path)
    return path


def test_rgba_mask_drawn_in_its_alpha_channel_uses_the_alpha(tmp_path):
    """A mask painted as opaque strokes on a transparent layer (constant colour) regenerated 100% of the image."""
    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:5, 3:7] = 255
    mask, notes = load_mask(_rgba(tmp_path / "m.png", np.full((8, 8), 255), alpha), size=8)
    assert torch.equal(mask[0, 0], torch.from_numpy(alpha >= 128).float())
    assert any("alpha channel" in n for n in notes)
    colour = np.zeros((8, 8), np.uint8)
    colour[1:3, 1:3] = 255
    mask, notes = load_mask(_rgba(tmp_path / "c.png", colour, np.full((8, 8), 255)), size=8)  # opaque: the colour
    assert torch.equal(mask[0, 0], torch.from_numpy(colour >= 128).float())
    assert not any("alpha" in n for n in notes)
    with pytest.raises(FlowTurboError, match="both a drawn colour and a drawn alpha channel"):
        load_mask(_rgba(tmp_path / "both.png", colour, alpha), size=8)


def test_tiny_edit_strength_names_the_smallest_that_works_and_that_one_runs(tmp_path, capsys):
    """`edit --strength 1e-17` talked about timesteps the user never gave."""
    image = gray_png(tmp_path / "in.png")
    edit = ["edit", "--image", str(image), "--classes", "3", "--schedule", "H2", "--device", "cpu", "--no-progress"]
    assert main([*edit, "--strength", "1e-17", "--out", str(tmp_path / "o")]) == 2
    err = one_error(capsys, "--strength 1e-17 is too small for the 2 steps of H2", "use --strength ")
    least = err.split("use --strength ")[1].split()[0]
    assert main([*edit, "--strength", least, "--out", str(tmp_path / "o")]) == 0  # the printed number works


def test_one_sample_count_rule_one_number(capsys):
    """`eval --samples` with 4 images asked for 129, then refused 130 for needing 500."""
    from flowturbo.training.evaluation import MIN_METRIC_SAMPLES, check_sample_count

    asked = set()
    for n in (4, 129, 130):
        with pytest.raises(FlowTurboError) as caught:
            check_sample_count(n, feature_dim=128, flag="--samples")
        asked.add(str(caught.value).split("at least ")[1].split()[0])
    assert asked == {str(MIN_METRIC_SAMPLES)}
    assert check_sample_count(MIN_METRIC_SAMPLES, feature_dim=128) is None
    with pytest.raises(FlowTurboError, match="at least 2049 samples"):
        check_sample_count(MIN_METRIC_SAMPLES, feature_dim=2048)


def test_a_missing_teacher_is_refused_before_the_dataset_is_encoded(tmp_path, capsys, monkeypatch):
    """`train refiner` encodes its dataset before it loads the teacher: a typo in --teacher is caught first."""
    from flowturbo.training.trainers import refiner

    def encode(*args, **kwargs):
        raise AssertionError("the dataset was prepared before the refusal")

    monkeypatch.setattr(refiner, "prepare_latent_data", encode)
    assert main(["train", "refiner", "--preset", "tiny", "--teacher", str(tmp_path / "runs" / "pred-typo"),
                 "--out", str(tmp_path / "ref")]) == 2
    one_error(capsys, f"--teacher {tmp_path / 'runs' / 'pred-typo'} not found")
    assert list(tmp_path.iterdir()) == []
