"""`flowturbo sample` and `flowturbo schedule` end to end on a small random bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import main
from flowturbo.runtime.images import make_grid, to_uint8, write_sample_folder
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.bundle import make_random_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "tiny"
    make_random_bundle(folder, preset="SiT-T/2", input_size=8, in_channels=4, num_classes=10, seed=0,
                       with_refiner=True, decoder="identity")
    return folder


def test_schedule_json_counts(capsys):
    assert main(["schedule", "H1P5R3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["predictor_calls"], info["refiner_calls"]) == (7, 6)
    assert set(info) >= {"steps", "timesteps", "predictor_calls", "refiner_calls", "id"}


def test_schedule_bad_spec_is_one_line_error(capsys):
    assert main(["schedule", "H2Q1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowturbo schedule: error: unknown step letter 'Q'") and "Traceback" not in err


def test_sample_writes_grid_pngs_and_record(bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sample", "--model", str(bundle_dir), "--schedule", "H1P2R1", "--classes", "1,2,3",
                 "--num-images", "5", "--cfg", "2.0", "--seed", "3", "--batch", "2", "--device", "cpu",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sample (ODE)" in printed and "ms/image" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["num_images"] == 5 and record["labels"] == [1, 2, 3, 1, 2]
    assert record["predictor_calls_per_batch"] == 4 and record["refiner_calls_per_batch"] == 2
    assert record["num_batches"] == 3 and record["backend"] == "pytorch" and record["seconds_per_image"] > 0
    assert record["schedule"]["notation"] == "H1P2R1" and record["schedule"]["guidance_scale"] == 2.0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "grid.png" in pngs and len(pngs) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folders left


def test_batching_does_not_change_images(bundle_dir):
    sampler = Sampler.from_bundle(str(bundle_dir), device="cpu")
    schedule = sampler.default_schedule("H1P2R1", cfg=2.0)
    whole = sampler.sample([4, 0, 9, 2, 2], schedule=schedule, seed=11, progress=False)
    split = sampler.sample([4, 0, 9, 2, 2], schedule=schedule, seed=11, batch_size=2, progress=False)
    torch.testing.assert_close(whole.images, split.images, **tol("sampler_fp32"))
    other = sampler.sample([4, 0, 9, 2, 2], schedule=schedule, seed=12, progress=False)
    assert not torch.allclose(whole.images, other.images)


def test_sample_failures_leave_nothing(bundle_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["sample", "--model", str(bundle_dir), "--classes", "3,10", "--out", str(out), "--device", "cpu"]) == 2
    assert "outside [0, 10)" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(out), "--device", "cpu"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_folder_guard(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    images = to_uint8(torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    with pytest.raises(FlowTurboError, match="not a flowturbo output"):
        write_sample_folder(precious, images, [0, 1], {})
    assert (precious / "thesis.txt").read_text() == "do not delete"
    first = write_sample_folder(tmp_path / "o", images, [0, 1], {"n": 1})
    again = write_sample_folder(first, images[:1], [1], {"n": 2})  # a previous output is replaced whole
    assert json.loads((again / "run.json").read_text()) == {"n": 2} and len(list(again.glob("*.png"))) == 2


def test_grid_and_uint8():
    images = torch.linspace(-1, 1, 3 * 1 * 2 * 2).reshape(3, 1, 2, 2)
    pixels = to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 2, 2, 1) and pixels.min() == 0 and pixels.max() == 255
    grid = make_grid(pixels, columns=2, padding=1)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    np.testing.assert_array_equal(grid[1:3, 1:3], pixels[0])
    np.testing.assert_array_equal(grid[4:6, 1:3], pixels[2])
    Image.fromarray(grid[..., 0])  # a valid image


def test_cli_execution_flags_reach_the_sampler_and_the_graph_path_is_reported(bundle_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """`--no-cuda-graph` / `--kernels` / `--dtype` reach Sampler.from_bundle; a graphed run prints its capture
    as a row of its own and records the path in run.json (the CUDA graph replaced by the CPU stand-in)."""
    from flowturbo.runtime.cuda_graphs import ReplayByCallBackend

    seen: list[dict] = []
    real = Sampler.from_bundle.__func__

    def graphed(cls, model=None, **kwargs):
        seen.append(dict(kwargs))
        kwargs["cuda_graph"] = kwargs["cuda_graph"] is not False  # CUDA's default, on this CPU
        return real(cls, model, graph_backend=ReplayByCallBackend(), **kwargs)

    monkeypatch.setattr(Sampler, "from_bundle", classmethod(graphed))
    common = ["sample", "--model", str(bundle_dir), "--schedule", "H1P1R1", "--num-images", "3", "--device", "cpu",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "graph")]) == 0
    printed = capsys.readouterr().out
    assert seen[-1]["cuda_graph"] is None and seen[-1]["kernel_backend"] == "auto" and seen[-1]["dtype"] is None
    assert "execution: reference kernels + CUDA graph" in printed
    assert "graph capture" in printed and "sample+decode" in printed and "sample (ODE)" not in printed
    record = json.loads((tmp_path / "graph" / "run.json").read_text())
    assert record["execution"]["cuda_graph"] is True and record["seconds"]["cuda_graph_capture"] > 0

    assert main([*common, "--no-cuda-graph", "--kernels", "reference", "--dtype", "float32",
                 "--out", str(tmp_path / "eager")]) == 0
    printed = capsys.readouterr().out
    assert seen[-1]["cuda_graph"] is False and seen[-1]["kernel_backend"] == "reference"
    assert seen[-1]["dtype"] == "float32"
    assert "graph capture" not in printed and "sample (ODE)" in printed
    record = json.loads((tmp_path / "eager" / "run.json").read_text())
    assert record["execution"]["cuda_graph"] is False and "cuda_graph_capture" not in record["seconds"]
