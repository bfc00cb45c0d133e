"""Issue 12's hostile-user cases, one test each: every one ends as one clear `error:` line (exit 2) or a correct
result, with nothing of the user's lost and nothing left behind.

A tiny random bundle (SiT-T/2 on 8x8 latents, identity decoder) and one ONNX export of it serve all tests.
"Before any work" is checked with call counters on the model loaders, never with timers.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowturbo import fileio
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.cli import main
from flowturbo.training.bundle import load_bundle
from cli_checks import one_error_line as _one_error_line
from cli_checks import snapshot as _snapshot
from micro_models import save_tiny_bundle

SCHEDULE_ARGS = ["--schedule", "H1P1R1", "--cfg", "2.0"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A depth-1, width-32 SiT + refiner on (3, 6, 6) latents with an identity decoder (exports in seconds)."""
    return save_tiny_bundle(tmp_path_factory.mktemp("safety") / "micro", seed=0)


EXPORT_ARGS = [*SCHEDULE_ARGS, "--batch", "1:2:4", "--format", "onnx", "--no-validate"]


@pytest.fixture(scope="module")
def exported(bundle_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety_export") / "art"
    assert main(["export", "--model", str(bundle_dir), *EXPORT_ARGS, "--out", str(out)]) == 0
    return out


def _sample(bundle_dir: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--model", str(bundle_dir), *SCHEDULE_ARGS, "--num-images", "2", "--device", "cpu",
                 "--no-progress", "--out", str(out), *extra])


@pytest.fixture
def count_model_loads(monkeypatch):
    """Counts Sampler / exported-sampler constructions: 0 means the command stopped before any work."""
    from flowturbo.runtime import backends
    from flowturbo.runtime.sampler import Sampler

    calls = []
    real_bundle, real_exported = Sampler.from_bundle, backends.load_exported_sampler

    def from_bundle(*args, **kwargs):
        calls.append("bundle")
        return real_bundle(*args, **kwargs)

    def load_exported(*args, **kwargs):
        calls.append("exported")
        return real_exported(*args, **kwargs)

    monkeypatch.setattr(Sampler, "from_bundle", staticmethod(from_bundle))
    monkeypatch.setattr(backends, "load_exported_sampler", load_exported)
    return calls


def _unwritable(folder: Path):
    """Make ``folder`` unwritable even for root (chattr +i) or by mode; returns an undo function or None."""
    if os.geteuid() == 0:
        if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
        return None
    folder.chmod(0o555)
    return lambda: folder.chmod(0o755)


# ----------------------------------------------------------------------------------- 1. data loss
def test_sample_refuses_user_folder_holding_run_json(bundle_dir, tmp_path, capsys):
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "thesis.txt").write_text("four years of work")
    (user / "run.json").write_text('{"mine": true}')
    (user / "photos" / "cat.png").write_bytes(b"\x89PNG not really")
    before = _snapshot(user)
    assert _sample(bundle_dir, user) == 2
    _one_error_line(capsys, "refusing to replace", "'photos/'", "'run.json'", "'thesis.txt'")
    assert _snapshot(user) == before and sorted(os.listdir(tmp_path)) == ["user"]


def test_sample_refuses_earlier_output_with_user_added_files(bundle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _sample(bundle_dir, out) == 0
    (out / "notes.txt").write_text("my notes about these images")
    before = _snapshot(out)
    assert _sample(bundle_dir, out, "--seed", "1") == 2
    _one_error_line(capsys, "flowturbo did not write", "'notes.txt'")
    assert _snapshot(out) == before
    (out / "notes.txt").unlink()
    assert _sample(bundle_dir, out, "--seed", "1") == 0  # a pure flowturbo output is replaced whole
    assert json.loads((out / "run.json").read_text())["seed"] == 1


def test_sample_keeps_a_flowturbo_output_placed_inside_out(bundle_dir, tmp_path, capsys):
    """Audit gap 1: `cp -a conc out1/kept_run; sample --out out1` must not delete kept_run."""
    out1, conc = tmp_path / "out1", tmp_path / "conc"
    assert _sample(bundle_dir, out1) == 0 and _sample(bundle_dir, conc, "--seed", "1") == 0
    shutil.copytree(conc, out1 / "kept_run")
    before = _snapshot(out1)
    capsys.readouterr()
    assert _sample(bundle_dir, out1, "--seed", "2") == 2
    _one_error_line(capsys, "flowturbo did not write", "'kept_run/.flowturbo-owned.json'")
    assert _snapshot(out1) == before and sorted(os.listdir(tmp_path)) == ["conc", "out1"]


def test_sample_leaves_users_hidden_folders_beside_out(bundle_dir, tmp_path):
    """Audit gap 2: a user's `.out1.old-backup/` and `.out1.tmp-mine/` beside --out survive a run."""
    out1 = tmp_path / "out1"
    assert _sample(bundle_dir, out1) == 0
    mine = [tmp_path / ".out1.old-backup", tmp_path / ".out1.tmp-mine", tmp_path / ".out1.tmp-a8d7f6"]
    for folder in mine:
        folder.mkdir()
        (folder / "keep.txt").write_text("the user's")
    assert _sample(bundle_dir, out1, "--seed", "1") == 0
    assert all((folder / "keep.txt").read_text() == "the user's" for folder in mine)
    assert sorted(os.listdir(tmp_path)) == sorted(["out1", *(f.name for f in mine)])


def test_relative_out_for_train_and_sample(bundle_dir, tmp_path, capsys, monkeypatch):
    """Audit gap 3: a relative --out gives the same ownership records (and messages) as an absolute one."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "autoencoder", *AE_ARGS, "--out", "tr_ae"]) == 0
    assert fileio.read_ownership("tr_ae").files == {
        "autoencoder.safetensors", "autoencoder_config.json", "config.json",
        "autoencoder/.flowturbo-owned.json", "decoder_mse/.flowturbo-owned.json"}
    assert "config.json" in fileio.read_ownership("tr_ae/autoencoder").files
    capsys.readouterr()
    assert main(["train", "autoencoder", *AE_ARGS, "--out", "tr_ae"]) == 2  # the right refusal, not "not written"
    _one_error_line(capsys, "already holds checkpoints", "--resume")
    assert main(["train", "predictor", "--preset", "tiny", "--autoencoder", "tr_ae", "--image-size", "32",
                 "--image-channels", "1", "--limit", "8", "--steps", "1", "--batch-size", "4", "--no-progress",
                 "--out", "tr_p"]) == 0
    assert {"latents.pt", "predictor.safetensors", "config.json"} <= fileio.read_ownership("tr_p").files
    assert fileio.unknown_entries("tr_p") == [] and fileio.unknown_entries("tr_ae") == []
    assert _sample(bundle_dir, Path("s")) == 0 and _sample(bundle_dir, Path("s"), "--seed", "1") == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["seed"] == 1
    assert fileio.unknown_entries("s") == []


def test_profile_refuses_user_folder_holding_profile_json(bundle_dir, tmp_path, capsys, count_model_loads):
    user = tmp_path / "prof"
    (user / "data").mkdir(parents=True)
    (user / "profile.json").write_text("{}")
    (user / "data" / "important.csv").write_text("a,b\n1,2\n")
    before = _snapshot(user)
    assert main(["profile", "--model", str(bundle_dir), "--schedule", "H2", "--repeats", "1", "--warmup", "0",
                 "--no-kernels", "--device", "cpu", "--out", str(user)]) == 2
    _one_error_line(capsys, "'data/'", "'profile.json'")
    assert _snapshot(user) == before and count_model_loads == []


# ---------------------------------------------------------------------------- 2. concurrent writers
HOLDER = textwrap.dedent("""
    import sys
    from flowturbo.fileio import lock_target
    with lock_target(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _other_writer(target: Path) -> subprocess.Popen:
    """Another flowturbo process in the middle of writing ``target`` (it holds the target's lock)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_concurrent_samples_to_one_out_second_fails_at_once(bundle_dir, tmp_path, capsys, count_model_loads):
    out = tmp_path / "out"
    writer = _other_writer(out)
    try:
        assert _sample(bundle_dir, out) == 2
        _one_error_line(capsys, f"another flowturbo process (pid {writer.pid}) is writing", "--wait")
        assert count_model_loads == [] and not out.exists()
    finally:
        writer.stdin.close()
        writer.wait()
    import threading

    writer = _other_writer(out)
    release = threading.Timer(0.3, writer.stdin.close)
    release.start()
    try:  # --wait queues behind the other writer, then succeeds
        assert _sample(bundle_dir, out, "--wait") == 0 and (out / "run.json").is_file()
    finally:
        release.cancel()
        writer.wait()


def test_two_concurrent_exports_to_one_new_out_second_fails(bundle_dir, tmp_path, capsys):
    out = tmp_path / "art"
    writer = _other_writer(out)
    try:
        assert main(["export", "--model", str(bundle_dir), *EXPORT_ARGS, "--out", str(out)]) == 2
        _one_error_line(capsys, f"(pid {writer.pid}) is writing")
        assert not out.exists()
    finally:
        writer.stdin.close()
        writer.wait()


# --------------------------------------------------------------------------- 3. integrity bypass
def _edited(exported: Path, tmp_path: Path, old: str, new: str) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(exported, copy)
    text = (copy / "manifest.json").read_text()
    assert old in text
    (copy / "manifest.json").write_text(text.replace(old, new, 1))
    return copy


def _assert_refused_everywhere(folder: Path, tmp_path: Path, capsys, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        load_artifacts(folder)
    assert main(["sample", "--artifacts", str(folder), "--backend", "onnxruntime", "--num-images", "1",
                 "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "modified after it was written")
    from flowturbo.runtime.cpp_backend import cpp_unavailable_reason

    if cpp_unavailable_reason() is None:  # the C++ reader refuses the same edit (before loading any engine)
        import flowturbo._runner as runner

        with pytest.raises(CheckpointError, match=match):
            runner.ScheduleRunner(str(folder), device="cpu", format="onnx")


def test_manifest_with_a_removed_file_entry_is_refused(exported, tmp_path, capsys):
    manifest = fileio.read_sealed_json(exported / "manifest.json", fix="")
    name = "refiner_step.onnx"
    entry = json.dumps({name: manifest["files"][name]}, indent=2, sort_keys=True)[1:-1].strip()
    text = (exported / "manifest.json").read_text()
    snippet = text[text.index(f'"{name}": {{'):]
    snippet = snippet[: snippet.index("}") + 1]
    assert json.loads("{" + snippet + "}") == json.loads("{" + entry + "}")
    copy = _edited(exported, tmp_path, snippet, '"removed": {"bytes": 0, "sha256": "0"}')
    (copy / name).write_bytes(b"modified weights")
    _assert_refused_everywhere(copy, tmp_path, capsys, "modified after it was written")


def test_manifest_with_an_edited_batch_range_is_refused(exported, tmp_path, capsys):
    copy = _edited(exported, tmp_path, '"max": 4', '"max": 64')
    _assert_refused_everywhere(copy, tmp_path, capsys, "batch range")


def test_manifest_with_an_edited_precision_is_refused(exported, tmp_path, capsys):
    copy = _edited(exported, tmp_path, '"precision": "fp32"', '"precision": "fp16"')
    _assert_refused_everywhere(copy, tmp_path, capsys, "precision")


def _resealed(exported: Path, tmp_path: Path, edit) -> Path:
    """A copy whose manifest was changed by ``edit`` and then re-sealed (a tool recomputing manifest_sha256)."""
    copy = tmp_path / "resealed"
    shutil.copytree(exported, copy)
    manifest = fileio.read_sealed_json(copy / "manifest.json", fix="")
    edit(manifest)
    (copy / "manifest.json").write_bytes(fileio.sealed_json_bytes(manifest))
    return copy


def _set_batch_everywhere(m):  # top level, key_fields and the key: only the graphs' specs still say 1:2:4
    m["batch"]["max"] = 64
    m["key_fields"]["batch"] = "1:2:64"
    m["key"] = fileio.artifact_key(m["key_fields"])


def _set_precision_everywhere(m):
    m["precision"] = m["key_fields"]["precision"] = "fp16"
    m["key"] = fileio.artifact_key(m["key_fields"])


RESEALED_EDITS = {
    "batch range": (lambda m: m["batch"].update(max=64), "batch range '1:2:64' differs from the batch range '1:2:4'"),
    "precision": (lambda m: m.update(precision="fp16"), "precision 'fp16' differs"),
    "key_fields without the key": (lambda m: m["key_fields"].update(batch="1:2:64"), "is not the key of its key_fields"),
    "batch range, key_fields and key": (_set_batch_everywhere, "spec has the batch range '1:2:4', the manifest '1:2:64'"),
    "precision, key_fields and key": (_set_precision_everywhere, "the precision 'fp16' needs 'float16'"),
}


@pytest.mark.parametrize("what", sorted(RESEALED_EDITS))
def test_resealed_manifest_edits_are_refused(exported, tmp_path, capsys, what):
    """Audit gap 5: an edit whose seal was recomputed is cross-checked against key_fields, key and the specs."""
    edit, needle = RESEALED_EDITS[what]
    copy = _resealed(exported, tmp_path, edit)
    with pytest.raises(CheckpointError, match="re-sealed, so it cannot be trusted"):
        load_artifacts(copy)
    for backend in ("onnxruntime", "cpp"):
        assert main(["sample", "--artifacts", str(copy), "--backend", backend, "--num-images", "1",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
        from flowturbo.runtime.cpp_backend import cpp_unavailable_reason

        if backend == "onnxruntime" or cpp_unavailable_reason() is None:
            assert needle in err and "re-sealed" in err, err
    assert not (tmp_path / "o").exists()


def test_manifest_must_list_the_files_its_variant_needs(exported, tmp_path):
    """Even a re-sealed manifest (a tool, not a hand edit) must list every graph of its variant."""
    copy = tmp_path / "resealed"
    shutil.copytree(exported, copy)
    manifest = fileio.read_sealed_json(copy / "manifest.json", fix="")
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["role"] != "refiner"]
    (copy / "manifest.json").write_bytes(fileio.sealed_json_bytes(manifest))
    with pytest.raises(CheckpointError, match="needs onnx graphs for predictor, refiner, decoder"):
        load_artifacts(copy)
    manifest = fileio.read_sealed_json(exported / "manifest.json", fix="")
    del manifest["files"]["decoder.onnx"]
    (copy / "manifest.json").write_bytes(fileio.sealed_json_bytes(manifest))
    with pytest.raises(CheckpointError, match="does not list decoder.onnx"):
        load_artifacts(copy)


# ------------------------------------------------------------ 4. output-path failures before the work
def test_out_in_proc_is_refused_before_sampling(bundle_dir, capsys, count_model_loads):
    assert _sample(bundle_dir, Path("/proc/x")) == 2
    _one_error_line(capsys, "cannot write in /proc")
    assert count_model_loads == []


def test_unwritable_parent_is_refused_before_sampling_and_export(bundle_dir, tmp_path, capsys, count_model_loads,
                                                                 monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    undo = _unwritable(parent)
    if undo is None:
        pytest.skip("cannot make a folder unwritable for root here (no chattr)")
    import flowturbo.training.bundle as bundle_module

    loads = []
    monkeypatch.setattr(bundle_module, "load_bundle", lambda *a, **k: loads.append(1))
    try:
        assert _sample(bundle_dir, parent / "out") == 2
        _one_error_line(capsys, "cannot write in")
        assert main(["export", "--model", str(bundle_dir), "--out", str(parent / "art")]) == 2
        _one_error_line(capsys, "cannot write in")
    finally:
        undo()
    assert count_model_loads == [] and loads == [] and os.listdir(parent) == []


def test_dotdot_out_after_a_missing_folder_is_refused_before_sampling_and_export(bundle_dir, tmp_path, capsys,
                                                                               count_model_loads, monkeypatch):
    """Audit gap 4: `--out a/../newout` with `a` missing was accepted by the pre-flight, then failed after the
    work; now it is refused before any model is loaded, naming the fix."""
    import flowturbo.training.bundle as bundle_module

    loads = []
    monkeypatch.setattr(bundle_module, "load_bundle", lambda *a, **k: loads.append(1))
    monkeypatch.chdir(tmp_path)
    assert _sample(bundle_dir, Path("a/../newout")) == 2
    _one_error_line(capsys, "a/../newout", "cannot be followed", "newout")
    assert main(["export", "--model", str(bundle_dir), *EXPORT_ARGS, "--out", "a/../art"]) == 2
    _one_error_line(capsys, "a/../art", "cannot be followed")
    assert count_model_loads == [] and loads == [] and os.listdir(tmp_path) == []


def test_immutable_existing_output_is_refused_without_debris(bundle_dir, tmp_path, capsys, count_model_loads):
    out = tmp_path / "out"
    with fileio.OutputFolder(out, command="sample") as folder, folder.staging() as staging:
        (staging / "run.json").write_text("{}")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("no immutable flag here (chattr)")
    try:
        assert _sample(bundle_dir, out) == 2
        _one_error_line(capsys, "immutable")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert count_model_loads == [] and sorted(os.listdir(tmp_path)) == ["out"]  # no .out.old-* folders


# --------------------------------------------------------------------------------------- 5. debris
def test_killed_export_staging_is_removed_by_the_next_run(bundle_dir, exported, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = tmp_path / f".art.flowturbo-tmp-{dead.pid}-0badcafe"
    debris.mkdir()
    (debris / "predictor_step.onnx").write_bytes(b"\0" * 4096)  # the graph a killed export was writing
    legacy = tmp_path / ".art.tmp-a8d7f6"  # no owner pid in the name: could be the user's, so it is kept
    legacy.mkdir()
    assert main(["export", "--model", str(bundle_dir), *EXPORT_ARGS, "--out", str(art)]) == 0  # reused as is
    assert sorted(os.listdir(tmp_path)) == [".art.tmp-a8d7f6", "art"]


# ---------------------------------------------------------------------------------- 6. tracebacks
@pytest.mark.parametrize("seed", [str(2**64), str(2**63)])
def test_seed_at_or_above_2_63_is_refused(bundle_dir, tmp_path, capsys, count_model_loads, seed):
    assert _sample(bundle_dir, tmp_path / "o", "--seed", seed) == 2
    _one_error_line(capsys, "--seed must be an integer in [0, 2^63)")
    assert count_model_loads == [] and os.listdir(tmp_path) == []


def test_device_tpu_is_refused(bundle_dir, tmp_path, capsys, count_model_loads):
    assert _sample(bundle_dir, tmp_path / "o", "--device", "tpu") == 2
    _one_error_line(capsys, "unknown --device 'tpu'")
    assert main(["export", "--model", str(bundle_dir), "--device", "tpu", "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "unknown --device 'tpu'")
    assert count_model_loads == [] and os.listdir(tmp_path) == []


AE_ARGS = ["--preset", "tiny", "--image-size", "32", "--limit", "8", "--steps", "2", "--finetune-steps", "1",
           "--batch-size", "4", "--finetune-batch-size", "4", "--latent-scale-images", "8", "--no-progress"]


def test_train_resume_force_into_another_model_size_is_refused(tmp_path, capsys):
    out = tmp_path / "ae"
    assert main(["train", "autoencoder", *AE_ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "autoencoder", *AE_ARGS, "--base-channels", "16", "--resume", "--force",
                 "--out", str(out)]) == 2
    _one_error_line(capsys, "model architecture differs", "model.base_channels: 8 -> 16")


def test_resume_checks_weight_shapes_even_when_the_config_hides_them(tmp_path):
    from flowturbo.training.trainers.common import _check_same_architecture

    small, large = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)
    with pytest.raises(FlowTurboError, match=r"another model architecture.*weight: checkpoint \(4, 3\), model \(5, 3\)"):
        _check_same_architecture(large, small.state_dict(), tmp_path / "step_00000002")


# ------------------------------------------------------------------------------ 7. misleading messages
def test_inconsistent_bundle_hint_is_followable(bundle_dir, tmp_path, capsys):
    folder = tmp_path / "b"
    shutil.copytree(bundle_dir, folder)
    (folder / "refiner.safetensors").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["refiner"] = None  # a bundle without refiner whose default schedule still has R steps
    (folder / "config.json").write_text(json.dumps(config))
    assert _sample(folder, tmp_path / "o") == 2
    err = _one_error_line(capsys, '"defaults": {"schedule": "H8"}', str(folder / "config.json"))
    assert "use a schedule without R" not in err  # the old hint, which --schedule H8 could not follow
    config["defaults"]["schedule"] = "H8"  # following the hint works
    (folder / "config.json").write_text(json.dumps(config))
    assert load_bundle(folder).refiner is None


def test_eval_num_samples_zero_names_the_flag(capsys, count_model_loads):
    assert main(["eval", "--num-samples", "0"]) == 2
    err = _one_error_line(capsys, "--num-samples must be an integer in [1, ")
    assert "class" not in err and count_model_loads == []


def test_train_autoencoder_tiny_names_the_flag_that_fixes_its_size(tmp_path, capsys):
    assert main(["train", "autoencoder", "--preset", "tiny", "--limit", "8", "--out", str(tmp_path / "ae")]) == 2
    _one_error_line(capsys, "--image-size 32 --image-channels 1")
    assert os.listdir(tmp_path) == []


def test_reexport_hint_keeps_cfg(exported, bundle_dir, tmp_path, capsys):
    """The hint carries --model/--cfg/--format/--batch/--opset/--precision/--variant over and names a new --out
    beside the export: it runs as printed, and the sample then runs on its output."""
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    assert main(["sample", "--artifacts", str(art), "--backend", "onnxruntime", "--schedule", "H1P2R1",
                 "--out", str(tmp_path / "o")]) == 2
    err = _one_error_line(capsys, "re-export with `flowturbo export --schedule H1P2R1 --cfg 2` (in full",
                          f"`flowturbo export --model {bundle_dir} --schedule H1P2R1 --cfg 2 --format onnx "
                          f"--batch 1:2:4 --opset 18 --precision fp32 --variant time-input --out {art}-H1P2R1`")
    command = shlex.split(err.split("`")[3])
    assert main([*command[1:], "--no-validate"]) == 0  # it runs as printed (parity checks skipped: speed)
    assert main(["sample", "--artifacts", f"{art}-H1P2R1", "--backend", "onnxruntime", "--schedule", "H1P2R1",
                 "--no-progress", "--out", str(tmp_path / "o")]) == 0


def test_reexport_command_for_the_default_model_and_a_custom_grid(tmp_path):
    """The embedded default needs no --model (its source is not a folder), a folder that is gone becomes a
    placeholder, and a custom time grid is carried as --timesteps (else the command builds another schedule)."""
    from flowturbo.runtime.artifacts import export_command
    from flowturbo.runtime.cli import build_parser
    from flowturbo.schedule import SamplingSchedule

    manifest = {"model": {"source": "embedded default"}, "formats": ["onnx"], "batch": {"min": 1, "opt": 2, "max": 4},
                "precision": "fp32", "variant": "time-input"}
    grid = SamplingSchedule.parse("H2", guidance_scale=1.5, timesteps=[0.0, 0.3, 1.0])
    command = export_command(grid, manifest)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.model is None and args.timesteps == "0.0,0.3,1.0" and args.out == "NEW_DIR"  # no --out given
    assert "--timesteps" not in export_command(SamplingSchedule.parse("H2", guidance_scale=1.5), manifest)
    manifest["model"]["source"] = str(tmp_path / "gone")
    assert "--model MODEL_DIR" in export_command(grid, manifest)
    manifest["model"]["source"] = str(tmp_path)
    assert f"--model {tmp_path}" in export_command(grid, manifest)


# --------------------------------------------------------------------------------- 8. silent oddities
def test_negative_seed_is_refused(bundle_dir, tmp_path, capsys, count_model_loads):
    assert _sample(bundle_dir, tmp_path / "o", "--seed", "-1") == 2
    _one_error_line(capsys, "[0, 2^63)")
    assert count_model_loads == []


def test_metrics_below_minimum_sample_count_refused_unless_allowed(capsys, count_model_loads):
    from flowturbo.training.evaluation import MIN_METRIC_SAMPLES, DomainFeatures, evaluate_samples
    from flowturbo.training.evaluation.classifier import ClassifierConfig, FashionClassifier

    assert main(["eval", "--num-samples", "4"]) == 2
    _one_error_line(capsys, f"at least {MIN_METRIC_SAMPLES}", "--allow-small-sample")
    assert count_model_loads == []
    torch.manual_seed(0)
    features = DomainFeatures(FashionClassifier(ClassifierConfig(widths=(4, 8), embed_dim=8)).eval(), device="cpu")
    images = torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    reference = features.extract(torch.rand(12, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1,
                                 progress=False)
    from flowturbo.training.evaluation import ReferenceStatistics

    ref = ReferenceStatistics.from_features(reference)
    with pytest.raises(FlowTurboError, match="--allow-small-sample"):
        evaluate_samples(images, features=features, reference=ref, progress=False)
    result = evaluate_samples(images, features=features, reference=ref, progress=False, allow_small_sample=True)
    assert result["warning"].startswith("WARNING: only 12 samples") and result["fid"] is not None


def test_eval_small_sample_warning_is_printed_on_stderr_too(bundle_dir, tmp_path, capsys, monkeypatch):
    """--allow-small-sample: the warning goes to stderr as well as into the JSON (the scoring is stubbed)."""
    import flowturbo.runtime.cli as cli
    import flowturbo.training.evaluation as evaluation

    assert _sample(bundle_dir, tmp_path / "s") == 0
    capsys.readouterr()
    warning = "WARNING: only 2 samples: FID / precision / recall are not meaningful"
    monkeypatch.setattr(cli, "eval_features", lambda args, device: (None, None))
    monkeypatch.setattr(evaluation, "evaluate_samples", lambda images, labels, **kw: {"fid": 1.0, "warning": warning})
    assert main(["eval", "--samples", str(tmp_path / "s"), "--allow-small-sample", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == warning and json.loads(captured.out)["warning"] == warning


def test_resume_without_an_earlier_run_is_an_error(tmp_path, capsys):
    assert main(["train", "autoencoder", *AE_ARGS, "--resume", "--out", str(tmp_path / "none")]) == 2
    _one_error_line(capsys, "holds no checkpoint to resume from", "drop --resume")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("batch", ["1:2", "8", "1:2:3:4", "a:b:c"])
def test_export_batch_must_be_min_opt_max(bundle_dir, tmp_path, capsys, batch):
    assert main(["export", "--model", str(bundle_dir), "--batch", batch, "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "is not MIN:OPT:MAX")
    assert os.listdir(tmp_path) == []


def test_export_folder_permissions_match_sample_folders(exported, bundle_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert _sample(bundle_dir, tmp_path / "s") == 0
    finally:
        os.umask(old)
    for folder in (exported, tmp_path / "s"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert fileio.read_ownership(exported).files >= {"manifest.json", "decoder.onnx"}


def test_export_over_own_output_needs_overwrite_and_keeps_user_files(bundle_dir, exported, tmp_path, capsys):
    copy = tmp_path / "art"
    shutil.copytree(exported, copy)
    assert main(["export", "--model", str(bundle_dir), "--schedule", "H2", "--batch", "1:1:2",
                 "--out", str(copy)]) == 2
    _one_error_line(capsys, "--overwrite")
    (copy / "README.txt").write_text("how I made this")
    assert main(["export", "--model", str(bundle_dir), "--schedule", "H2", "--batch", "1:1:2", "--overwrite",
                 "--out", str(copy)]) == 2
    _one_error_line(capsys, "'README.txt'")
    assert (copy / "README.txt").read_text() == "how I made this"


def test_eval_out_refuses_a_file_that_is_not_an_eval_result(tmp_path, capsys, count_model_loads):
    mine = tmp_path / "thesis.txt"
    mine.write_text("four years of work")
    assert main(["eval", "--num-samples", "600", "--out", str(mine)]) == 2
    _one_error_line(capsys, "not a flowturbo eval result")
    assert mine.read_text() == "four years of work" and count_model_loads == []
    assert main(["eval", "--num-samples", "600", "--out", "/proc/x/result.json"]) == 2
    _one_error_line(capsys, "cannot write in /proc")
