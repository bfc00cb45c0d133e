"""flowturbo.fileio: atomic files, ownership records, locks, pre-flight, debris removal, sealed JSON.

Pure Python (no torch): these run in a fraction of a second each.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowturbo import fileio
from flowturbo.errors import FlowTurboError
from flowturbo.fileio import OWNERSHIP_FILE, OutputFolder, SealError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ------------------------------------------------------------------------------------- atomic files
def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path, umask_022):
    path = tmp_path / "sub" / "a.json"
    fileio.atomic_write_json(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert _mode(path) == 0o644 and _mode(path.parent) == 0o755
    fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["a.json"]  # no temp file left


def test_atomic_write_failure_keeps_old_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(ValueError):
        fileio.atomic_write_json(path, {"x": float("nan")})  # not JSON: refused before touching the file
    with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with OutputFolder(tmp_path / "out", command="test") as out, out.staging() as staging:
            (staging / "f.txt").write_text("x")
            os.chmod(staging / "f.txt", 0o600)  # tools such as mkstemp write 0600: normalised on commit
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o750 and _mode(tmp_path / "out" / "f.txt") == 0o640


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 * fileio.HASH_CHUNK_BYTES // 2)
    (tmp_path / "f").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest() == fileio.sha256_bytes(data)


# --------------------------------------------------------------------------------- ownership records
def test_unknown_entries_respect_records_and_nested_records(tmp_path):
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.txt").write_text("b")
    assert fileio.unknown_entries(root) == ["a.txt", "sub/"]  # no record: everything is unknown
    fileio.write_ownership(root, ["a.txt", "sub/b.txt"])
    assert fileio.unknown_entries(root) == []
    (root / "sub" / "mine.txt").write_text("user")
    (root / "photos").mkdir()
    assert fileio.unknown_entries(root) == ["photos/", "sub/mine.txt"]
    nested = root / "stage"
    nested.mkdir()
    (nested / "w.bin").write_text("w")
    fileio.add_owned(nested, [nested / "w.bin"])  # no lock held on root: root's record does not vouch for it
    assert {"stage/.flowturbo-owned.json", "stage/w.bin"} <= set(fileio.unknown_entries(root))
    fileio.add_owned(root, [nested / OWNERSHIP_FILE])  # root's record lists the nested record: now trusted
    assert not any(u.startswith("stage/") for u in fileio.unknown_entries(root))
    fileio.remove_owned(root, [root / "sub"])
    assert "sub/b.txt" in fileio.unknown_entries(root)


def test_flowturbo_output_copied_into_another_output_is_not_replaced(tmp_path):
    """Gap 1: a nested record counts only when the parent's record lists it; a copied-in output is the user's."""
    out1, other = tmp_path / "out1", tmp_path / "conc"
    for target, content in ((out1, "mine"), (other, "kept")):
        with OutputFolder(target, command="sample") as out, out.staging() as staging:
            (staging / "run.json").write_text(content)
    shutil.copytree(other, out1 / "kept_run")
    with pytest.raises(FlowTurboError, match=r"flowturbo did not write: 'kept_run/\.flowturbo-owned\.json', "
                                             r"'kept_run/run\.json'"):
        with OutputFolder(out1, command="sample") as out, out.staging() as staging:
            (staging / "run.json").write_text("new")
    assert (out1 / "kept_run" / "run.json").read_text() == "kept" and (out1 / "run.json").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["conc", "out1"]


def test_record_written_under_a_locked_target_is_listed_by_it(tmp_path):
    """A training run's stage folder (own record, written under the run's lock) belongs to the run."""
    run = tmp_path / "run"
    with fileio.owned_run_folder(run, command="train"):
        fileio.atomic_write_text(run / "stage" / "config.json", "{}", record=run / "stage")
    assert fileio.read_ownership(run).files == {"stage/.flowturbo-owned.json"}
    assert fileio.read_ownership(run / "stage").files == {"config.json"}
    assert fileio.unknown_entries(run) == []
    fileio.check_replaceable(run)


def test_ownership_paths_are_relative_to_the_folder_with_a_relative_cwd_path(tmp_path, monkeypatch):
    """Gap 3: ``record="tr_p"`` with ``tr_p/latents.pt`` (both relative to the cwd) records ``latents.pt``."""
    monkeypatch.chdir(tmp_path)
    fileio.atomic_write_bytes(Path("tr_p") / "latents.pt", b"x", record="tr_p")
    fileio.add_owned(Path("tr_p"), [tmp_path / "tr_p" / "sub" / "b"])
    assert fileio.read_ownership("tr_p").files == {"latents.pt", "sub/b"}
    fileio.remove_owned("tr_p", [Path("tr_p") / "latents.pt"])
    assert fileio.read_ownership("tr_p").files == {"sub/b"}


def test_check_replaceable_names_unknown_entries(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(FlowTurboError, match=r"not a flowturbo output .*'run.json', 'thesis.txt'"):
        fileio.check_replaceable(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlowTurboError, match="is not a folder"):
        fileio.check_replaceable(tmp_path / "file")
    fileio.check_replaceable(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    fileio.check_replaceable(tmp_path / "empty")


def test_output_folder_replaces_only_its_own_output(tmp_path):
    target = tmp_path / "out"
    for content in ("one", "two"):
        with OutputFolder(target, command="test") as out, out.staging() as staging:
            (staging / "data.txt").write_text(content)
    assert (target / "data.txt").read_text() == "two"
    assert fileio.read_ownership(target).files == {"data.txt"}
    (target / "notes.txt").write_text("user's")
    with pytest.raises(FlowTurboError, match="'notes.txt'"), OutputFolder(target, command="test"):
        pass
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no lock file, no staging folder


def test_user_file_added_during_the_run_stops_the_swap(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("1")
    with pytest.raises(FlowTurboError, match="'late.txt'"):
        with OutputFolder(target, command="test") as out, out.staging() as staging:
            (staging / "a").write_text("2")
            (target / "late.txt").write_text("written by the user meanwhile")
    assert (target / "a").read_text() == "1" and (target / "late.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_run_removes_the_parents_it_created(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "a" / "b" / "out", command="test"):
        raise RuntimeError("sampling failed")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- locks
HOLDER = textwrap.dedent("""
    import sys
    from flowturbo.fileio import lock_target
    with lock_target(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _hold_lock(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_writer_naming_the_pid(tmp_path):
    target = tmp_path / "out"
    holder = _hold_lock(target)
    try:
        with pytest.raises(FlowTurboError, match=rf"another flowturbo process \(pid {holder.pid}\) is writing .*out"):
            with fileio.lock_target(target):
                pass
    finally:
        holder.stdin.close()
        holder.wait()
    with fileio.lock_target(target) as path:  # free again
        assert path.read_text().strip() == str(os.getpid())
    assert os.listdir(tmp_path) == []  # the lock file is removed on release


def test_lock_wait_queues_behind_the_holder(tmp_path):
    import threading

    target = tmp_path / "out"
    holder = _hold_lock(target)
    release = threading.Timer(0.2, holder.stdin.close)
    release.start()
    try:
        with fileio.lock_target(target, wait=True):
            assert holder.wait() == 0  # we got the lock only after the holder released it and exited
    finally:
        release.cancel()
        holder.wait()


def test_lock_is_reentrant_within_a_process(tmp_path):
    with fileio.lock_target(tmp_path / "x"), fileio.lock_target(tmp_path / "x"):
        pass
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ pre-flight
def test_preflight_refuses_unwritable_locations(tmp_path):
    with pytest.raises(FlowTurboError, match=r"cannot write in /proc"):
        fileio.check_writable_target("/proc/x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlowTurboError, match="is not a folder"):
        fileio.check_writable_target(tmp_path / "file" / "out")
    fileio.check_writable_target(tmp_path / "new" / "deeper" / "out")
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the probe leaves nothing


@pytest.mark.skipif(shutil.which("chattr") is None or os.geteuid() != 0, reason="needs chattr and root")
def test_preflight_refuses_an_immutable_target(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("1")
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        with pytest.raises(FlowTurboError, match="immutable"):
            fileio.check_writable_target(target)
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


def test_failed_swap_reports_and_leaves_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("old")
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # take the rename-aside path
    real_rename = os.rename

    def refuse_second(src, dst):
        if Path(src).name.startswith(".out.flowturbo-tmp"):
            raise PermissionError(1, "Operation not permitted")
        return real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", refuse_second)
    with pytest.raises(FlowTurboError, match="cannot put the new output in place .*unchanged"):
        with OutputFolder(target, command="test") as out, out.staging() as staging:
            (staging / "a").write_text("new")
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------ debris
def test_next_run_removes_debris_of_dead_processes(tmp_path):
    target = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.flowturbo-tmp-{dead}-abcd1234"
    live = tmp_path / f".out.flowturbo-tmp-{alive}-abcd1234"
    aside = tmp_path / f".out.flowturbo-old-{dead}-abcd1234"  # an old output set aside, the new one in place
    for folder in (stale, live, aside):
        folder.mkdir()
        (folder / "graph.onnx").write_bytes(b"x" * 10)
    fileio.write_ownership(aside, ["graph.onnx"], "test")  # as OutputFolder writes it
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("1")
    assert not stale.exists() and not aside.exists() and live.exists()


def test_users_dot_folders_beside_the_target_survive(tmp_path):
    """Gap 2: only names flowturbo gives (with the owner's pid) are debris; a user's hidden folders stay."""
    target = tmp_path / "out1"
    with OutputFolder(target, command="sample") as out, out.staging() as staging:
        (staging / "a").write_text("0")
    users = [tmp_path / ".out1.old-backup", tmp_path / ".out1.tmp-mine", tmp_path / ".out1.scratch-1",
             tmp_path / ".out1.tmp-k2j3h4a8"]  # the last: an older flowturbo's mkdtemp name (no owner pid)
    for folder in users:
        folder.mkdir()
        (folder / "keep.txt").write_text("the user's")
    aside = tmp_path / f".out1.flowturbo-old-{_dead_pid()}-0123abcd"  # a set-aside folder with a user file in it
    aside.mkdir()
    (aside / "a").write_text("old")
    (aside / "keep.txt").write_text("the user's")
    fileio.write_ownership(aside, ["a"])
    with OutputFolder(target, command="sample") as out, out.staging() as staging:
        (staging / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    for folder in users + [aside]:
        assert (folder / "keep.txt").read_text() == "the user's", folder


def test_dotdot_after_a_missing_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """Gap 4: ``a/../x`` with ``a`` missing cannot be followed by the kernel: refused by the pre-flight."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlowTurboError, match=r"--out a/\.\./x: a is not an existing folder, .*\(e\.g\. x\)"):
        with OutputFolder("a/../x", command="sample"):
            raise AssertionError("the work must not start")
    (tmp_path / "a").mkdir()
    with OutputFolder("a/../x", command="sample") as out, out.staging() as staging:
        (staging / "f").write_text("1")
    assert out.path == tmp_path / "x" and (tmp_path / "x" / "f").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["a", "x"]


def test_unremovable_previous_output_is_reported_not_fatal(tmp_path, monkeypatch, capsys):
    """Gap 6: the old copy that cannot be removed (an immutable file in it) is named in one warning line."""
    target = tmp_path / "out"
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("old")
    real_rmtree = shutil.rmtree

    def refuse_old(path, *args, **kwargs):
        if ".out.flowturbo-" in str(path):  # the swapped-out previous content: an immutable file inside
            return None
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fileio.shutil, "rmtree", refuse_old)
    with OutputFolder(target, command="test") as out, out.staging() as staging:
        (staging / "a").write_text("new")
    monkeypatch.undo()
    left = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert (target / "a").read_text() == "new" and len(left) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning:") and str(left[0]) in err, err


def test_old_state_put_back_when_a_swap_was_interrupted(tmp_path):
    target = tmp_path / "out"
    aside = tmp_path / f".out.flowturbo-old-{_dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "a").write_text("old complete state")
    fileio.write_ownership(aside, ["a"])
    with fileio.lock_target(target):
        fileio.remove_stale_debris(target)
    assert (target / "a").read_text() == "old complete state" and not aside.exists()


def test_stale_temp_files_and_staging_inside_a_folder(tmp_path):
    dead = _dead_pid()
    temp = tmp_path / f".state.pt.{dead}.abcd1234{fileio.TEMP_FILE_SUFFIX}"
    temp.write_bytes(b"half")
    staging = tmp_path / f".step_00000002.flowturbo-tmp-{dead}-00ff00ff"
    staging.mkdir()
    assert fileio.remove_stale_temp_files(tmp_path) == [temp]
    assert fileio.remove_stale_staging(tmp_path) == [staging]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- sealed JSON
def test_sealed_json_round_trip_and_every_edit_refused(tmp_path):
    manifest = {"batch": {"min": 1, "opt": 2, "max": 4}, "precision": "fp32", "files": {"a.onnx": {"bytes": 3}},
                "name": "caf\u00e9", "time": 0.1}
    path = tmp_path / "manifest.json"
    path.write_bytes(fileio.sealed_json_bytes(manifest))
    assert fileio.read_sealed_json(path, fix="x") == manifest
    import json

    assert json.loads(path.read_text())[fileio.SEAL_KEY]  # still plain JSON for people and tools
    original = path.read_text()
    edits = {
        "batch range": original.replace('"max": 4', '"max": 64'),
        "precision": original.replace('"fp32"', '"fp16"'),
        "removed entry": original.replace('"a.onnx": {\n      "bytes": 3\n    }', ""),
        "whitespace": original.replace('"opt": 2', '"opt":  2'),
        "unsealed": json.dumps(manifest, indent=2),
    }
    for what, text in edits.items():
        assert text != original, what
        path.write_text(text)
        with pytest.raises(SealError, match="re-export"):
            fileio.read_sealed_json(path, fix="re-export")


def test_seal_key_is_reserved():
    with pytest.raises(FlowTurboError, match="reserved"):
        fileio.sealed_json_bytes({fileio.SEAL_KEY: "x"})


def test_fileio_is_torch_free():
    code = "import sys, flowturbo.fileio, flowturbo.cliargs, flowturbo.imageio; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
