"""bench/gpu_suite.py on the CPU (``--dry-run``): the same code paths as on a lent GPU, phase by phase, and with
injected faults — so its first device run works (issue 18).

The slow tests run the suite as the device does (separate phase commands, then ``--merge``; a fresh tree and venv
without ``--skip-build`` for the build-and-re-exec path); the fast ones pin the record's merge and leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from tolerances import tol

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "bench" / "gpu_suite.py"
sys.path.insert(0, str(REPO / "bench"))

from suite.faults import Faults, InjectedFault  # noqa: E402
from suite.record import Recorder, merge_phases, short_table  # noqa: E402

MAX_OUT_FILES = 8  # what the device tool brings back from $OUT


def run_suite(out: Path, state: Path, *args: str, cwd: Path = REPO, python: str = sys.executable,
              timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(cwd / "bench" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           "--state-dir", str(state), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def table_lines(stdout: str) -> list[str]:
    lines = stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("row "))
    return lines[header:]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# -------------------------------------------------------------------------------------------- slow, whole
@pytest.mark.slow
def test_phases_as_on_the_device_run_every_row_and_merge(tmp_path):
    """Phases 1, 2, 3 as separate commands (each OUT a fresh folder, one state folder), then --merge: every row,
    every user command, the tests; every row within tolerance of row (b) and of the float64 path."""
    state = tmp_path / "state"
    outs = {}
    for phase in "123":
        out = tmp_path / f"out{phase}"
        proc = run_suite(out, state, "--phase", phase, "--skip-build", "--skip-kernel-bench")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
        assert len(list(out.iterdir())) <= MAX_OUT_FILES, sorted(p.name for p in out.iterdir())
        assert table_lines(proc.stdout)[-1]  # the short table is printed last
        outs[phase] = out
    # the last phase's gpu_suite.json already merges the machine's phases; --merge does the same from the files
    merged_on_device = read(outs["3"] / "gpu_suite.json")
    proc = subprocess.run([sys.executable, str(SUITE), "--merge", *(str(outs[p] / f"phase{p}.json") for p in "123"),
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    merged = read(tmp_path / "merged" / "gpu_suite.json")
    assert merged["rows"].keys() == merged_on_device["rows"].keys()
    rows = merged["rows"]
    assert {f"{key}@2" for key in "abcdef"} <= set(rows), sorted(rows)
    assert "b@2~p2" in rows  # phase 2 measured its own baseline
    assert not merged["errors"], merged["errors"]
    for key, row in rows.items():
        assert row["ms_per_image"] > 0 and row["images_finite"] and row.get("valid", True), key
        limit = tol("sampler_bf16" if key.startswith("a") else "sampler_fp32")["atol"] * max(1.0, row["ref_max_abs"])
        assert row["max_abs_diff_vs_b"] <= limit, (key, row["max_abs_diff_vs_b"])
        assert row["max_abs_diff_vs_f64"] <= limit, (key, row["max_abs_diff_vs_f64"])
        if not key.startswith("a"):
            assert row["max_abs_diff_vs_f64"] > 0, key  # float32 rows are not float64: the check compares
    assert rows["d@2"]["note"].startswith("triton kernels + CUDA graph")  # read after the run: the real path
    assert rows["c@2"]["replayed"] and rows["d@2"]["replayed"]
    tasks = merged["tasks"]
    for name in ("package", "sample", "profile", "inpaint", "edit"):
        assert tasks[f"p1:user:{name}"]["status"] == "ok", tasks[f"p1:user:{name}"]
    assert tasks["p1:user:sample"]["execution"].startswith("reference kernels")  # the printed execution line
    assert abs(tasks["p1:user:profile"]["relative_difference"]) <= 0.05  # the per-step table adds up
    assert tasks["p3:tests"]["status"] == "ok" and tasks["p2:export"]["status"] == "ok"
    assert merged["preflight"]["p1:cuda_graph"]["ok"] and merged["preflight"]["p1:aoti"]["ok"]
    assert set(merged["ratios"]["2"]) >= {"d_over_c", "b_over_d", "e_over_d", "d_over_c_normalised"}
    assert set(merged["text_rows"]) == {"t:E28", "t:H8", "t:H1P5", "t:H1P5+adaln"}  # phase 3's row (t)


TEXT_SCHEDULES = {"t:E28": 28, "t:H8": 16, "t:H1P5": 7, "t:H1P5+adaln": 7}  # row (t): schedule -> transformer calls


@pytest.mark.slow
def test_text_row_dry_run_measures_the_schedules_and_a_missing_diffusers_is_a_recorded_skip(tmp_path):
    """Row (t) alone, as phase 3 runs it: E28, H8, H1P5 and H1P5 with the fused adaLN through the SD3 adapter and
    the integrator, each with its calls and ms/image, in the JSON and the table. Then without diffusers (its import
    fails in the pre-flight): the row is skipped naming the wheel to carry, the record and the table still come out."""
    out = tmp_path / "out"
    proc = run_suite(out, tmp_path / "state", "--phase", "3", "--rows", "t", "--skip-build", "--skip-tests",
                     "--skip-kernel-bench")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    record = read(out / "phase3.json")
    rows = record["text_rows"]
    assert set(rows) == set(TEXT_SCHEDULES), sorted(rows)
    for key, calls in TEXT_SCHEDULES.items():
        row = rows[key]
        assert row["calls"] == calls and row["ms_per_image"] > 0 and row["latents_finite"], (key, row)
        assert row["ms_per_call"] == pytest.approx(row["ms_per_image"] / calls)
        if key != "t:E28":
            assert row["speedup_vs_E28"] > 0
    fused = rows["t:H1P5+adaln"]
    assert fused["max_abs_diff_vs_unfused"] <= 1e-4 * max(1.0, fused["latents_max_abs"])  # float32: same numbers
    about = record["text_row"]
    assert about["image_tokens"] == 16 and about["transformer_batch"] == 2 and about["cfg"] > 1
    # block 0: dual attention (SD35AdaLayerNormZeroX) + its context norm; block 1 (the last): its norm1, and its
    # context norm is an AdaLayerNormContinuous (context only): two modules fused
    assert about["adaln_fusion"]["fused"] == {"AdaLayerNormZero": 2}
    assert "SD35AdaLayerNormZeroX" in about["adaln_fusion"]["not_fused"]
    table = "\n".join(table_lines(proc.stdout))
    assert "(t:H1P5+adaln)" in table and "vs E28" in table and not record["errors"]

    out = tmp_path / "no_diffusers"
    proc = run_suite(out, tmp_path / "state2", "--phase", "3", "--rows", "t", "--skip-build", "--skip-tests",
                     "--skip-kernel-bench", "--inject-fault", "preflight:diffusers")
    assert proc.returncode == 1, proc.stdout[-3000:]  # the failed pre-flight import is an error; the row a skip
    record = read(out / "phase3.json")
    assert "text_rows" not in record and "row:t" not in record["errors"]
    assert "diffusers-0.42.1-py3-none-any.whl" in record["skipped"]["row:t"]
    assert "skipped p3:row:t: needs diffusers" in "\n".join(table_lines(proc.stdout))


@pytest.mark.slow
def test_failures_are_recorded_and_the_table_still_comes_out(tmp_path):
    """A row that raises, a failed float64 reference, a pytest run and a kernel bench that outlive their timeouts:
    each one JSON error (tracebacks in one errors.log), the other rows and parts still run, table printed."""
    out = tmp_path / "out"
    proc = run_suite(out, tmp_path / "state", "--phase", "all", "--rows", "ab", "--skip-user-commands",
                     "--inject-fault", "row:b@2", "--inject-fault", "f64", "--inject-fault", "tests-timeout",
                     "--inject-fault", "kernel-bench-timeout")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read(out / "phaseall.json")
    assert {"row:b@2", "float64_reference", "tests", "kernel_bench"} <= set(record["errors"]), record["errors"]
    assert "a@2" in record["rows"] and "b@2" not in record["rows"]  # the other row ran
    assert "max_abs_diff_vs_f64" not in record["rows"]["a@2"]  # no reference, no column: not a made-up number
    assert record["tasks"]["tests"]["status"] == "timeout" and record["tasks"]["kernel_bench"]["status"] == "timeout"
    errors_log = (out / "errors.log").read_text()
    assert "row:b@2" in errors_log and "InjectedFault" in errors_log  # the traceback, in the one log
    assert (out / "gpu_tests.log").exists() and len(list(out.iterdir())) <= MAX_OUT_FILES
    table = "\n".join(table_lines(proc.stdout))
    assert "(a) fp16-autocast eager" in table and "error pall:row:b@2" in table and "error pall:tests" in table


@pytest.mark.slow
def test_a_graph_fallback_and_a_failed_export_check_are_errors_not_silent(tmp_path):
    """Row (c) whose capture fell back is an error (and kept out of the ratios); an export whose check against
    eager fails is still measured (rows e, f) with the failure in the record."""
    out = tmp_path / "out"
    proc = run_suite(out, tmp_path / "state", "--phase", "2", "--rows", "cf", "--skip-build",
                     "--inject-fault", "capture", "--inject-fault", "export-check")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = read(out / "phase2.json")
    c = record["rows"]["c@2"]
    assert c["valid"] is False and c["replayed"] is False and "capture failed" in c["note"]
    assert "RowFallback" in record["errors"]["row:c@2"]
    assert read(out / "gpu_suite.json")["ratios"]["2"]["d_over_c"] is None
    assert record["aoti_export"]["validation_failures"] and "aoti_export:check" in record["errors"]
    assert "f@2" in record["rows"]


@pytest.mark.slow
def test_a_failed_model_build_and_an_exhausted_budget_still_write_the_record(tmp_path):
    out = tmp_path / "models"
    proc = run_suite(out, tmp_path / "state", "--phase", "1", "--skip-build", "--inject-fault", "models")
    assert proc.returncode == 1 and "models" in read(out / "phase1.json")["errors"]
    assert "skipped pall" not in proc.stdout and "skipped p1:row:a" in "\n".join(table_lines(proc.stdout))
    out = tmp_path / "budget"
    proc = run_suite(out, tmp_path / "state2", "--phase", "all", "--skip-build", "--budget-s", "0")
    assert proc.returncode == 0, proc.stdout[-3000:]
    skipped = read(out / "phaseall.json")["skipped"]
    assert {"models", "tests", "kernel_bench"} <= set(skipped) and all("time budget" in r for r in skipped.values())


@pytest.mark.slow
def test_first_run_builds_reexecutes_and_imports_the_fresh_install(tmp_path):
    """The device's first run: a copy of the tree, a venv where flowturbo is not installed, no --skip-build.
    The build succeeds and the suite re-executes itself so the editable install imports (before: a
    ModuleNotFoundError after a successful build). Then a failed build goes on with the pure-Python layers."""
    tree = tmp_path / "tree"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = str(venv / "bin" / "python")
    # This environment's packages, without flowturbo's editable install: a folder of links on the new venv's path.
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("flowturbo", "_flowturbo", "__editable__", "pip", "_distutils")) \
                and not entry.name.endswith(".pth"):
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_deps.pth").write_text(str(deps) + "\n")
    assert subprocess.run([python, "-c", "import flowturbo.runtime"], capture_output=True).returncode != 0

    out = tmp_path / "out"
    proc = run_suite(out, tmp_path / "state", "--phase", "1", "--rows", "b", "--skip-user-commands",
                     cwd=tree, python=python)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    record = read(out / "phase1.json")
    assert record["build"]["returncode"] == 0 and record["build"]["importable_after_reexec"]
    assert record["resumed_after_build"] and "b@2" in record["rows"]
    assert record["preflight"]["runner"]["ok"], record["preflight"]["runner"]
    assert (out / "build.log").exists()

    out = tmp_path / "out_failed_build"
    proc = run_suite(out, tmp_path / "state", "--phase", "1", "--rows", "b", "--skip-user-commands",
                     "--inject-fault", "build", cwd=tree, python=python)
    record = read(out / "phase1.json")
    assert proc.returncode == 1 and "build" in record["errors"] and "b@2" in record["rows"]


def test_tests_pass_or_skip_on_a_host_without_the_interpreter(tmp_path):
    """On a CUDA machine TRITON_INTERPRET is not set: the fast-path tests must not assume the interpreter. With it
    off on this CPU they run where they can and skip the Triton ones with the reason (before: two failures)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/runtime/test_fast_path.py", "-k", "float64_reference_and_captures or triton_probe",
                           "-rs"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 skipped" in proc.stdout and "TRITON_INTERPRET is not 1" in proc.stdout


def test_disable_tf32_sets_ieee_float32():
    import conftest
    import torch

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        conftest.disable_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


# ------------------------------------------------------------------------------------------------- fast
def test_record_is_written_after_every_entry_and_merges_phases(tmp_path):
    state = tmp_path / "state"
    one = Recorder(tmp_path / "o1", "1", state, {"environment": {"torch": "x"}})
    one.row("b@8", {"row": "b", "batch": 8, "ms_per_image": 10.0})
    assert json.loads((tmp_path / "o1" / "phase1.json").read_text())["rows"]["b@8"]["ms_per_image"] == 10.0
    one.row("d@8", {"row": "d", "batch": 8, "ms_per_image": 4.0})
    two = Recorder(tmp_path / "o2", "2", state, {"environment": {"torch": "x"}})
    two.row("b@8", {"row": "b", "batch": 8, "ms_per_image": 20.0})  # phase 2 ran twice as slow (other clocks)
    two.row("c@8", {"row": "c", "batch": 8, "ms_per_image": 10.0})
    two.error("row:e@8", "RuntimeError: boom", "Traceback ...")
    merged = json.loads((tmp_path / "o2" / "gpu_suite.json").read_text())  # phase 2 merges the machine's phases
    assert set(merged["rows"]) == {"b@8", "d@8", "b@8~p2", "c@8"}
    assert merged["ratios"]["8"]["d_over_c"] == pytest.approx(0.4)
    assert merged["ratios"]["8"]["d_over_c_normalised"] == pytest.approx((4 / 10) / (10 / 20))
    assert merged["errors"] == {"p2:row:e@8": "RuntimeError: boom"}
    assert "error p2:row:e@8: RuntimeError: boom" in short_table(merged)
    assert "Traceback ..." in (tmp_path / "o2" / "errors.log").read_text()
    assert merge_phases([one.results, two.results])["rows"].keys() == merged["rows"].keys()


def test_leftovers_are_what_earlier_phases_skipped_for_time(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_suite

    state = tmp_path / "state"
    rec = Recorder(tmp_path / "o1", "1", state, {})
    rec.skip("d@8", "time budget: 3 s left of 270, needs ~8 s")
    rec.skip("user:edit", "time budget: 1 s left of 270, needs ~45 s")
    rec.skip("row:c", "needs graph: the pre-flight CUDA-graph capture failed")  # not for time: not retried
    rec2 = Recorder(tmp_path / "o2", "2", state, {})
    rec2.skip("export", "time budget: predictor_step (1/3) would not fit the time budget")
    assert gpu_suite.leftovers(state, "3") == ({"d@8"}, {"user:edit", "export"})
    assert gpu_suite.leftovers(state, "2") == ({"d@8"}, {"user:edit"})


def test_text_row_without_diffusers_or_failing_is_recorded_never_raised(tmp_path):
    """Row (t) in-process: no diffusers (pre-flight), an import that fails inside the row, an error after the
    imports — a skip naming the wheel, a skip, an error; nothing raises and the JSON is written each time."""
    import torch
    from suite.preflight import Capabilities
    from suite.text_row import run_text_row

    def run(caps: Capabilities, faults: list[str]) -> dict:
        rec = Recorder(tmp_path / "out", "3", None, {})
        run_text_row(rec, True, torch.device("cpu"), caps, Faults(faults), tmp_path / "work", lambda what, s: True,
                     1.0, warmup=0, replays=1)
        return json.loads((tmp_path / "out" / "phase3.json").read_text())

    caps = Capabilities()
    caps.disable("diffusers", "`from diffusers import AutoencoderKL` failed (see errors)")
    record = run(caps, [])
    skipped = record["skipped"]["row:t"]
    assert "needs diffusers" in skipped and ".devcarry/wheels/diffusers-" in skipped
    record = run(Capabilities(), ["text-row:import"])
    assert "No module named 'diffusers'" in record["skipped"]["row:t"] and not record["errors"]
    record = run(Capabilities(), ["text-row"])
    assert "InjectedFault" in record["errors"]["row:t"] and "text_rows" not in record


def test_faults_reject_unknown_names_and_fire_only_when_asked():
    faults = Faults(["row:b@2", "f64"])
    faults.fire("models")
    with pytest.raises(InjectedFault, match="f64"):
        faults.fire("f64")
    with pytest.raises(SystemExit, match="unknown --inject-fault"):
        Faults(["no-such-fault"])
