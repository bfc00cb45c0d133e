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


# --------------------------------------------------------------------------- every number flag, at parse time
def _parsers(parser, prefix=("flowturbo",)):
    """(command words, parser) of ``parser`` and every sub-parser below it."""
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def _all_actions():
    from flowturbo.runtime.cli import build_parser

    for words, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings:
                yield " ".join(words), action


def test_no_number_flag_is_a_bare_int_or_float():
    """Every number flag of every command carries its range (flowturbo.cliargs.Number): nan / inf / negative
    values where they mean nothing are refused while parsing, before anything is imported or loaded."""
    from flowturbo.cliargs import Number

    bare = [f"{command} {action.option_strings[0]}" for command, action in _all_actions()
            if action.type in (int, float) and not action.choices]  # (a fixed list of choices is a range too)
    assert bare == []
    numbers = [a for _, a in _all_actions() if isinstance(a.type, Number)]
    assert len(numbers) > 60  # sample, eval, export, profile, inpaint, edit, tune, train *: all of them


HOSTILE_NUMBERS = ["nan", "-nan", "inf", "-inf", "1e309", "-1", "-0", "0", "1", "0.5", "1e-17", "2" * 25, "-" + "9" * 21,
                   "x", " 3 ", "1_000", "0x10", "3.0"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_number_types_accept_only_values_in_their_range(data):
    """Whatever text a number flag gets, its type returns a finite value inside the range it names, or refuses with
    a message that says that range (argparse turns it into one `error:` line)."""
    import argparse

    from flowturbo.cliargs import Number

    numbers = {(c, a.option_strings[0]): a.type for c, a in _all_actions() if isinstance(a.type, Number)}
    command, flag = data.draw(st.sampled_from(sorted(numbers)))
    kind = numbers[(command, flag)]
    text = data.draw(st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.floats().map(repr), st.integers().map(str)))
    try:
        value = kind(text)
    except argparse.ArgumentTypeError as exc:
        assert kind.describe() in str(exc)
        return
    assert isinstance(value, kind.kind) and value == value and abs(value) != float("inf"), (command, flag, text)
    assert kind.low is None or value >= kind.low and not (kind.low_open and value == kind.low)
    assert kind.high is None or value <= kind.high and not (kind.high_open and value == kind.high)


# ------------------------------------------------------------------ other commands: refused before work, or work
COMMON = {
    "--seed": _int_text(-3, 2**64 + 3),
    "--cfg": st.sampled_from(["1.0", "0", "-1", "nan", "inf", "-inf", "1e309", "x"]),
    "--batch": _int_text(-1, 3),
    "--threads": _int_text(-1, 2),
    "--device": st.sampled_from(["cpu", "tpu", "cuda:x", ""]),
}
COMMAND_OPTIONS = {
    "profile": {**COMMON, "--warmup": _int_text(-1, 2), "--repeats": _int_text(-1, 2),
                "--backend": st.sampled_from(["pytorch", "onnxruntime", "x"])},
    "export": {"--cfg": COMMON["--cfg"], "--batch": st.sampled_from(["1:1:2", "2:1:1", "1:2", "x", "-1:1:1"]),
               "--opset": _int_text(-1, 30), "--trt-opt-level": _int_text(-1, 7), "--guidance-channels": _int_text(-1, 4),
               "--format": st.sampled_from(["onnx", "openvino", ""]), "--timesteps": st.sampled_from(["0,1", "nan", "1,0"])},
    "tune": {**COMMON, "--budget-ms": st.sampled_from(["20", "0", "-1", "nan", "inf", "1e309"]),
             "--num-samples": _int_text(-1, 600), "--eta": _int_text(-1, 4), "--heun": st.sampled_from(["0:3", "3:1", "x"]),
             "--max-steps": _int_text(-1, 70), "--vnorm-c": st.sampled_from(["0.2", "nan", "-1", ""]),
             "--latency-repeats": _int_text(-1, 2), "--general-max-steps": _int_text(-1, 8)},
    "eval": {**COMMON, "--num-samples": _int_text(-1, 3000), "--num-reference": _int_text(-1, 3)},
    "edit": {**COMMON, "--strength": st.sampled_from(["0.5", "0", "1", "1.5", "nan", "inf", "-0.1", "1e-17"]),
             "--num-images": _int_text(-1, 3), "--grid-scale": _int_text(-1, 3),
             "--classes": st.sampled_from(["0", "0,1,2", "x", ""])},
    "train predictor": {"--lr": st.sampled_from(["1e-3", "0", "-1", "nan", "inf"]), "--steps": _int_text(-1, 2),
                        "--ema-decay": st.sampled_from(["0.5", "1", "1.5", "nan", "-0.1"]),
                        "--label-dropout": st.sampled_from(["0.1", "1", "nan"]), "--seed": COMMON["--seed"],
                        "--max-minutes": st.sampled_from(["1", "0", "inf", "nan"]), "--batch-size": _int_text(-1, 2)},
}


@st.composite
def command_arguments(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMAND_OPTIONS)))
    options = COMMAND_OPTIONS[command]
    chosen = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=4, unique=True))
    argv = command.split()
    for name in chosen:
        argv += [name, draw(options[name])]
    return argv


class _Work(Exception):
    """Raised by the patched loaders: the command passed every check and started its work."""


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command_arguments())
def test_other_commands_refuse_before_any_work_or_start_it(tmp_path, capsys, monkeypatch, argv):
    """Any combination of hostile numbers for profile / export / tune / eval / edit / train ends in one `error:`
    line (exit 2) before any model loads, or reaches the work (a patched loader), never a traceback, never debris."""
    from flowturbo.runtime import backends, pytorch_backend
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.training import bundle, trainers

    def work(*args, **kwargs):
        raise _Work()

    monkeypatch.setattr(Sampler, "from_bundle", work)
    for module, name in ((backends, "load_exported_sampler"), (pytorch_backend, "load_pipeline"),
                         (bundle, "load_bundle"), (trainers, "train_predictor")):
        monkeypatch.setattr(module, name, work)
    work_dir = tmp_path / f"case{next(_counter)}"
    work_dir.mkdir()
    image = work_dir / "in.png"
    from PIL import Image

    Image.new("L", (32, 32), 90).save(image)
    extra = {"edit": ["--image", str(image)], "tune": [] if any(a.startswith("--budget") for a in argv)
             else ["--budget-calls", "6"], "train predictor": ["--preset", "tiny"]}.get(" ".join(argv[:2]) if
                                                                                       argv[0] == "train" else argv[0], [])
    if argv[0] == "edit" and "--strength" not in argv:
        extra += ["--strength", "0.5"]
    if argv[0] == "edit" and "--classes" not in argv:
        extra += ["--classes", "1"]
    out = work_dir / "out"
    command = [*argv, *extra, "--out", str(out)]
    try:
        code = main(command)
    except _Work:
        code = None
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (command, captured.err)
    if code is not None:
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "error:" in captured.err, \
            (command, captured.err)
    assert not out.exists() and sorted(os.listdir(work_dir)) == ["in.png"], (command, os.listdir(work_dir))
