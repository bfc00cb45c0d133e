"""Property-based test (hypothesis): any combination of `flowturbo sample` arguments ends in a result (exit 0),
one `error:` line (exit 2) or an argparse usage error (exit 2) — never a traceback, never debris.

Runs the CLI in-process on a depth-1 micro bundle; few, derandomized examples keep it to seconds.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowturbo.runtime.cli import main
from flowturbo.training.bundle import Bundle, BundleDefaults, save_bundle
from flowturbo.training.decoders import IdentityDecoder
from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner

_counter = itertools.count()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    config = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                       mlp_ratio=2.0, num_classes=4, class_dropout_prob=0.1, learn_sigma=False)
    predictor = SiT(config)
    refiner = VelocityRefiner(RefinerConfig.for_predictor(config))
    bundle = Bundle(predictor.eval(), refiner.eval(), IdentityDecoder(3).eval(), None, BundleDefaults("H1P1R1"))
    return save_bundle(bundle, tmp_path_factory.mktemp("props") / "micro")


def _int_text(low: int, high: int) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(low, high).map(str), st.sampled_from(["2" * 25, "-" + "9" * 21, "1.5", "x", ""]))


OPTIONS = {
    "--seed": _int_text(-3, 2**64 + 3),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:0", "cuda:x", "tpu", "cpu:1", ":", "CPU", ""]),
    "--num-images": _int_text(-2, 5),
    "--batch": _int_text(-1, 3),
    "--classes": st.sampled_from(["0", "1,2,3", "3,4", "-1", "", ",", "a", "0,,1", "99999999999999999999"]),
    "--cfg": st.sampled_from(["1.0", "2.5", "0", "-1", "nan", "inf", "1e308", "x"]),
    "--guidance-channels": _int_text(-1, 5),
    "--schedule": st.sampled_from(["H2", "H1P1R1", "R2", "E1", "HQ", "flowturbo-fast", "", "H0"]),
    "--dtype": st.sampled_from(["float32", "float64", "float16", "int8", "fp32", "x"]),
    "--grid-scale": _int_text(-1, 3),
    "--decoder": st.sampled_from(["ema", "mse", "x"]),
    "--backend": st.sampled_from(["pytorch", "onnxruntime", "aoti", "cpp", "x"]),
    "--threads": _int_text(-1, 2),
    "--artifacts": st.sampled_from(["/nonexistent/art", "/proc"]),
}
FLAGS = ["--no-progress", "--wait"]


@st.composite
def sample_arguments(draw) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=5, unique=True))
    argv: list[str] = []
    for name in chosen:
        argv += [name, draw(OPTIONS[name])]
    argv += [f for f in FLAGS if draw(st.booleans())]
    return argv


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sample_arguments())
def test_sample_arguments_never_end_in_a_traceback(bundle_dir, tmp_path, capsys, argv):
    work = tmp_path / f"case{next(_counter)}"
    work.mkdir()
    out = work / "out"
    command = ["sample", "--model", str(bundle_dir), "--no-progress", *argv, "--out", str(out)]
    try:
        code = main(command)
    except SystemExit as exc:  # argparse: usage + one error line, status 2
        code = exc.code
        assert code == 2, command
    captured = capsys.readouterr()
    assert code in (0, 2), command
    assert "Traceback" not in captured.err, (command, captured.err)
    if code == 2:
        assert "error:" in captured.err and not out.exists(), (command, captured.err)
    else:
        assert (out / "run.json").is_file()
    assert sorted(os.listdir(work)) == (["out"] if code == 0 else []), command  # no lock file, no staging folder
