"""Issue 19: a command's output never replaces another command's work or one of its own inputs.

The eight data-loss cases of the issue, one test each (each failed on 4f77170: the command deleted or
overwrote the folder), then the two rules behind them: the kinds rule (a command replaces only its own kind
of output; a bundle, an export and a training run are never replaced by another command, whatever flag is
given) and the input rule (an output that is, contains or lies inside an input, or another output, is refused
before any work, naming both; links resolved). One module-scoped world serves all tests: a real tiny
autoencoder run, a real ``train predictor`` run, a bundle packaged from them (with an encoder, so ``inpaint``
runs) and an ONNX export of it; a test copies the folder it points an output at.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowturbo import fileio
from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import main
from cli_checks import one_error_line as one_error
from cli_checks import snapshot

IMAGE_SIZE = 16  # the tiny autoencoder's images: 16x16 gray
TRAIN = ["--preset", "tiny", "--image-size", str(IMAGE_SIZE), "--no-progress", "--steps", "1"]


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("bag", "coat", "shoe")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 120, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8) + np.uint8(40 * c + 10)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """``images`` (a dataset folder), ``ae`` and ``pred`` (training runs), ``bundle`` (``train package`` of
    them, with an encoder) and ``export`` (its ONNX export), made through the command line."""
    root = tmp_path_factory.mktemp("issue19")
    images = _image_folder(root / "images")
    ae, pred, bundle, export = root / "ae", root / "pred", root / "bundle", root / "export"
    assert main(["train", "autoencoder", *TRAIN, "--dataset", str(images), "--finetune-steps", "1",
                 "--latent-scale-images", "4", "--out", str(ae)]) == 0
    assert main(["train", "predictor", *TRAIN, "--dataset", str(images), "--autoencoder", str(ae),
                 "--out", str(pred)]) == 0
    assert main(["train", "package", "--predictor", str(pred), "--autoencoder", str(ae), "--schedule", "H2",
                 "--out", str(bundle)]) == 0
    assert main(["export", "--model", str(bundle), "--schedule", "H2", "--batch", "1:2:4", "--no-validate",
                 "--with-encoder", "--out", str(export)]) == 0
    return {"images": images, "ae": ae, "pred": pred, "bundle": bundle, "export": export}


@pytest.fixture
def copy(world, tmp_path):
    """``copy(name)``: a copy of one of the world's folders in this test's own folder (the folder a test points an
    output at; inputs that are only read are used in place)."""
    return lambda name: Path(shutil.copytree(world[name], tmp_path / name, symlinks=True))


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model (bundle, export, official checkpoint) or starting a trainer fails the test: the command
    must have stopped before any work."""
    from flowturbo.runtime import backends, pytorch_backend
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.training import bundle, trainers

    def work(*args, **kwargs):
        raise AssertionError("the command did work before refusing")

    monkeypatch.setattr(Sampler, "from_bundle", work)
    for module, name in ((backends, "load_exported_sampler"), (pytorch_backend, "load_pipeline"),
                         (pytorch_backend, "load_bundle"), (bundle, "load_bundle"), (trainers, "train_predictor"),
                         (trainers, "train_refiner"), (trainers, "train_autoencoder")):
        monkeypatch.setattr(module, name, work)


def refused_keeping(folder: Path, argv: list[str], capsys, *needles: str) -> str:
    """``flowturbo ARGV`` ends in one `error:` line holding ``needles`` and leaves ``folder`` byte for byte."""
    before = snapshot(folder)
    assert main(argv) == 2
    err = one_error(capsys, *needles)
    assert snapshot(folder) == before
    return err


def _gray_png(path: Path, value: int | None = None) -> Path:
    rng = np.random.default_rng(1)
    pixels = rng.integers(20, 230, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8) if value is None else \
        np.full((IMAGE_SIZE, IMAGE_SIZE), value, np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _mask_png(path: Path) -> Path:
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    pixels[4:12, 4:12] = 255
    Image.fromarray(pixels).save(path)
    return path


# ----------------------------------------------------------------------------------- the eight cases
SAMPLE_LIKE = {
    "sample": ["sample", "--num-images", "2", "--no-progress"],
    "inpaint": ["inpaint", "--classes", "1", "--no-progress"],
    "profile": ["profile", "--repeats", "1", "--warmup", "0", "--no-kernels"],
}


@pytest.mark.parametrize("command", sorted(SAMPLE_LIKE))
def test_sample_like_out_equal_to_model_keeps_the_bundle(copy, tmp_path, capsys, no_work, command):
    """`flowturbo sample --model B --out B` deleted the bundle B (so did `inpaint` and `profile`)."""
    bundle = copy("bundle")
    extra = (["--image", str(_gray_png(tmp_path / "in.png")), "--mask", str(_mask_png(tmp_path / "mask.png"))]
             if command == "inpaint" else [])
    refused_keeping(bundle, [*SAMPLE_LIKE[command], *extra, "--model", str(bundle), "--out", str(bundle)], capsys,
                    f"--out {bundle} is --model {bundle}")


@pytest.mark.parametrize("victim, needle", [
    ("export", "it is a flowturbo export directory (written by `flowturbo export`)"),
    ("pred", "it is a flowturbo training run (written by `flowturbo train predictor`)"),
], ids=["export-typed-for-artifacts", "training-run"])
def test_sample_out_on_an_export_or_a_training_run_keeps_it(copy, capsys, no_work, victim, needle):
    """`flowturbo sample --out A` (meant as --artifacts A) deleted the export A; `flowturbo sample --out runs/pred`
    deleted a training run, checkpoints included."""
    target = copy(victim)
    refused_keeping(target, ["sample", "--no-progress", "--out", str(target)], capsys, needle, "never replaced")


def test_sample_out_equal_to_artifacts_keeps_the_export_it_reads(copy, capsys, no_work):
    """`flowturbo sample --artifacts A --backend onnxruntime --out A` deleted the export it was reading."""
    export = copy("export")
    refused_keeping(export, ["sample", "--artifacts", str(export), "--backend", "onnxruntime", "--out", str(export)],
                    capsys, f"--out {export} is --artifacts {export}")


def test_train_predictor_into_a_bundle_is_refused(world, copy, capsys, no_work):
    """`flowturbo train predictor ... --out B` wrote into the bundle B (its config.json and weights: B no longer
    loaded)."""
    bundle = copy("bundle")
    refused_keeping(bundle, ["train", "predictor", *TRAIN, "--dataset", str(world["images"]), "--autoencoder",
                             str(world["ae"]), "--out", str(bundle)], capsys,
                    "it is a flowturbo model bundle", "`flowturbo train predictor` writes only into a training run")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_model_b_out_b_is_refused_with_or_without_overwrite(copy, capsys, no_work, overwrite):
    """`flowturbo export --model B --out B` was refused with a wrong reason whose hint, --overwrite, then replaced
    the bundle with an export."""
    bundle = copy("bundle")
    refused_keeping(bundle, ["export", "--model", str(bundle), "--out", str(bundle), *overwrite], capsys,
                    f"--out {bundle} is --model {bundle}")


# ------------------------------------------------------------------------------------------- the kinds rule
OTHER_COMMANDS = {
    "sample": ["sample", "--no-progress"],
    "profile": ["profile", "--no-kernels"],
    "export": ["export", "--overwrite"],
    "package": ["train", "package", "--overwrite", "--predictor", "{pred}", "--autoencoder", "{ae}"],
    "train-refiner": ["train", "refiner", "--resume", "--force", "--teacher", "{bundle}", "--autoencoder", "{ae}",
                      *TRAIN, "--dataset", "{images}"],
}
OWN = {"bundle": "package", "export": "export", "pred": "train-predictor"}


@pytest.mark.parametrize("victim, command", [(v, c) for v in OWN for c in OTHER_COMMANDS if OWN[v] != c])
def test_no_command_replaces_another_kind_whatever_the_flags(world, copy, capsys, no_work, victim, command):
    """A bundle, an export and a training run are replaced (or written into) only by their own command, even
    with --overwrite / --resume --force."""
    target = copy(victim)
    refused_keeping(target, [a.format(**world) for a in OTHER_COMMANDS[command]] + ["--out", str(target)], capsys,
                    "refusing to write", "choose another --out")


def test_resumed_training_writes_only_into_its_own_command_run(world, copy, capsys, no_work):
    """`train refiner --resume` into a `train predictor` run is refused, whatever --force says."""
    run = copy("pred")
    refused_keeping(run, ["train", "refiner", "--teacher", str(world["bundle"]), "--autoencoder", str(world["ae"]),
                          *TRAIN, "--dataset", str(world["images"]), "--resume", "--force", "--out", str(run)], capsys,
                    "training run of `flowturbo train predictor`", "`flowturbo train refiner` writes only")


def test_records_name_their_kind(world):
    kinds = {name: json.loads((world[name] / fileio.OWNERSHIP_FILE).read_text()).get("kind")
             for name in ("ae", "pred", "bundle", "export")}
    assert kinds == {"ae": "training run", "pred": "training run", "bundle": "bundle", "export": "export"}


def _drop_kind(folder: Path, command: str | None = "") -> None:
    """Rewrite ``folder``'s record as an older flowturbo wrote it: no kind (and, with ``command=""``, no
    command either)."""
    record = json.loads((folder / fileio.OWNERSHIP_FILE).read_text())
    record.pop("kind", None)
    if command is not None:
        record["command"] = command
    (folder / fileio.OWNERSHIP_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize("name, kind", [("bundle", "bundle"), ("export", "export"), ("pred", "training run")])
def test_old_records_without_a_kind_are_told_by_their_files(copy, capsys, no_work, name, kind):
    """A record of an older flowturbo names no kind (nor, from the trainers' API, a command): the files tell
    (manifest.json: an export; checkpoints/: a training run; config.json + predictor.safetensors: a bundle)."""
    folder = copy(name)
    _drop_kind(folder)
    assert fileio.folder_kind(folder) == kind
    refused_keeping(folder, ["sample", "--no-progress", "--out", str(folder)], capsys,
                    f"it is a flowturbo {fileio.describe_kind(kind)}")


def test_an_old_record_whose_kind_cannot_be_told_is_refused(tmp_path, capsys, no_work):
    out = tmp_path / "old"
    out.mkdir()
    (out / "notes.bin").write_bytes(b"\x01\x02")
    fileio.write_ownership(out, ["notes.bin"])  # no command, no kind, files that tell nothing
    assert fileio.folder_kind(out) is None
    refused_keeping(out, ["sample", "--no-progress", "--out", str(out)], capsys,
                    "does not say which kind of output it is")


def test_sample_like_commands_replace_one_another(world, tmp_path, capsys):
    """sample / inpaint / edit / profile are one kind: a profile output is replaced by a sample."""
    out = tmp_path / "o"
    model = ["--model", str(world["bundle"])]
    assert main(["profile", *model, "--repeats", "1", "--warmup", "0", "--no-kernels", "--out", str(out)]) == 0
    assert main(["sample", *model, "--num-images", "2", "--no-progress", "--out", str(out)]) == 0
    assert (out / "run.json").is_file() and fileio.folder_kind(out) == fileio.KIND_SAMPLE


# ------------------------------------------------------------------------------------------- the input rule
@pytest.mark.parametrize("relation", ["contains", "lies inside"])
def test_out_containing_or_inside_an_input_is_refused(copy, capsys, no_work, relation):
    bundle = copy("bundle")
    out = bundle.parent if relation == "contains" else bundle / "samples"
    refused_keeping(bundle, ["sample", "--model", str(bundle), "--out", str(out)], capsys,
                    f"--out {out} {relation} --model {bundle}")
    assert not (bundle / "samples").exists()


@pytest.mark.parametrize("argv, flags", [
    (["eval", "--samples", "{s}", "--out", "{s}/metrics.json"], ("--out", "--samples")),
    (["inpaint", "--image", "{s}/in.png", "--mask", "{s}/mask.png", "--classes", "1", "--out", "{s}"],
     ("--out", "--image")),
    (["train", "package", "--predictor", "{pred}", "--autoencoder", "{ae}", "--out", "{ae}/bundle"],
     ("--out", "--autoencoder")),
    (["train", "predictor", "--preset", "tiny", "--dataset", "{s}", "--autoencoder", "{ae}", "--out", "{s}/run"],
     ("--out", "--dataset")),
    (["export", "--schedule", "{s}/schedule.json", "--out", "{s}"], ("--out", "--schedule")),
])
def test_every_command_refuses_an_out_over_any_of_its_inputs(world, tmp_path, capsys, no_work, argv, flags):
    s = tmp_path / "s"
    s.mkdir()
    _gray_png(s / "in.png")
    _mask_png(s / "mask.png")
    (s / "schedule.json").write_text("{}")
    names = {"s": s, "ae": world["ae"], "pred": world["pred"]}
    err = refused_keeping(s, [a.format(**names) for a in argv], capsys)
    assert f"{flags[0]} " in err and f" {flags[1]} " in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--out", "{t}", "--export", "{t}"], "--out {t} is --export {t}"),
    (["--cache", "{t}", "--out", "{t}"], "--out {t} is --cache {t}"),
    (["--out", "{t}", "--export", "{t}/art"], "--out {t} contains --export {t}/art"),
])
def test_tune_outputs_apart_before_the_search(tmp_path, capsys, no_work, argv, needle):
    """`tune --out X --export X` and `tune --cache X --out X` failed after the whole search."""
    t = tmp_path / "t"
    assert main(["tune", "--budget-ms", "20", *(a.format(t=t) for a in argv)]) == 2
    one_error(capsys, needle.format(t=t))
    assert list(tmp_path.iterdir()) == []


def test_tune_export_into_an_existing_export_needs_overwrite_before_the_search(world, tmp_path, capsys, no_work):
    """`tune --export X` into an existing folder failed after the whole search, naming a flag tune did not have."""
    export = world["export"]
    assert main(["tune", "--budget-ms", "20", "--export", str(export), "--out", str(tmp_path / "t")]) == 2
    one_error(capsys, "already holds an export directory; pass --overwrite")
    assert main(["tune", "--budget-ms", "20", "--export", str(world["bundle"]), "--overwrite", "--out",
                 str(tmp_path / "t")]) == 2
    one_error(capsys, "it is a flowturbo model bundle")
    assert list(tmp_path.iterdir()) == []


def test_a_link_to_an_input_is_that_input(copy, capsys, no_work):
    bundle = copy("bundle")
    link = bundle.parent / "link"
    link.symlink_to(bundle)
    refused_keeping(bundle, ["sample", "--model", str(link), "--out", str(bundle / "x")], capsys,
                    f"lies inside --model {link} (links resolved:")


@pytest.mark.parametrize("command", [["sample", "--no-progress"], ["eval", "--num-samples", "600"],
                                     ["export"], ["train", "package", "--predictor", "P", "--autoencoder", "A"]])
def test_a_link_as_out_is_refused_naming_its_target(tmp_path, capsys, no_work, command):
    """flowturbo does not write through links: the message names the link's target and the real path to pass."""
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    assert main([*command, "--out", str(link)]) == 2
    one_error(capsys, f"--out {link} is a symbolic link (to {target})", f"(--out {target})")
    assert list(target.iterdir()) == [] and link.is_symlink()


def test_check_apart_names_both_and_skips_missing_inputs(tmp_path):
    (tmp_path / "m").mkdir()
    fileio.check_apart([("--out", tmp_path / "o")], [("--model", tmp_path / "m"), ("--vae", tmp_path / "gone")])
    fileio.check_apart([("--out", tmp_path / "gone" / "x")], [("--vae", tmp_path / "gone")])  # missing: nothing lost
    with pytest.raises(FlowTurboError, match=r"--out .*/m/o lies inside --model .*/m: writing it"):
        fileio.check_apart([("--out", tmp_path / "m" / "o")], [("--model", tmp_path / "m")])
    with pytest.raises(FlowTurboError, match="two outputs of one command cannot share a folder"):
        fileio.check_apart([("--out", tmp_path / "a"), ("--export", tmp_path / "a")], [])


def test_config_of_the_run_itself_resumes_it(copy, capsys):
    """--config is read in full before anything is written, so `--config RUN/config.json --out RUN --resume`
    (continue a run with its own settings) is not an output over an input."""
    run = copy("pred")
    assert main(["train", "predictor", "--config", str(run / "config.json"), "--no-progress", "--steps", "2",
                 "--resume", "--out", str(run)]) == 0
    assert os.path.isdir(run / "checkpoints" / "step_00000002")


# ------------------------------------------------------------------------------- printed hints run as printed
def _printed_command(err: str) -> list[str]:
    """The last backticked command of an error line, split as a shell would."""
    import shlex

    return shlex.split(err.split("`")[-2])


@pytest.mark.slow
def test_batch_profile_hint_runs_as_printed(copy, tmp_path, capsys):
    export = copy("export")
    sample = ["sample", "--backend", "onnxruntime", "--num-images", "5", "--batch", "5", "--no-progress",
              "--out", str(tmp_path / "o")]
    assert main([*sample, "--artifacts", str(export)]) == 2
    command = _printed_command(one_error(capsys, "outside the exported profile 1:2:4", "--batch 1:2:5"))
    assert main([*command[1:], "--no-validate"]) == 0
    assert main([*sample, "--artifacts", command[command.index("--out") + 1]]) == 0


@pytest.mark.slow
def test_missing_encoder_hint_runs_as_printed(world, tmp_path, capsys):
    """The re-export hint keeps --with-encoder (and the batch profile, and names a new --out)."""
    plain = tmp_path / "plain"
    assert main(["export", "--model", str(world["bundle"]), "--schedule", "H2", "--batch", "1:2:4", "--no-validate",
                 "--out", str(plain)]) == 0
    capsys.readouterr()  # the export's progress bar
    edit = ["edit", "--backend", "onnxruntime", "--image", str(_gray_png(tmp_path / "in.png")), "--strength", "0.5",
            "--classes", "1", "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*edit, "--artifacts", str(plain)]) == 2
    err = one_error(capsys, "has no encoder graph", "--with-encoder", "--batch 1:2:4")
    command = _printed_command(err)
    assert main([*command[1:], "--no-validate"]) == 0
    assert main([*edit, "--artifacts", err.split("pass --artifacts ")[1].split()[0]]) == 0


def test_parse_error_hint_runs_as_printed(capsys):
    assert main(["sample", "--cfg", "nan"]) == 2
    command = _printed_command(one_error(capsys, "--cfg must be a finite number >= 0"))
    assert command == ["flowturbo", "sample", "--help"]
    assert main(command[1:]) == 0


def test_damaged_export_hint_keeps_encoder_batch_and_out(copy):
    """The re-export hint after a damaged export dropped --with-encoder, the batch profile and --out (following it
    failed again): it is built from the manifest and rebuilds the directory in place."""
    from flowturbo.errors import CheckpointError
    from flowturbo.runtime.artifacts import load_artifacts

    export = copy("export")
    target = export / "predictor_step.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        load_artifacts(export)
    command = _printed_command(str(caught.value))
    assert "--with-encoder" in command and ("--batch", "1:2:4") in zip(command, command[1:])
    assert command[-3:] == ["--out", str(export), "--overwrite"]
