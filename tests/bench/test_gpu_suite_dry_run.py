"""bench/gpu_suite.py --dry-run: the GPU suite's code paths on CPU, so it works the first time a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tolerances import tol

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_row(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--dry-run", "--skip-build",
                           "--skip-kernel-bench", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_suite.json").read_text())
    assert results["dry_run"] and not results.get("errors"), results.get("errors")
    rows = results["rows"]
    assert sorted(rows) == [f"{key}@2" for key in "abcdef"], sorted(rows)  # every row ran
    for key, row in rows.items():
        assert row["ms_per_image"] > 0 and row["images_finite"], key
        # float32 rows agree with the reference row (b) and with the float64 reference path; (a) runs under
        # bf16 autocast on the CPU.
        limit = tol("sampler_bf16" if key.startswith("a") else "sampler_fp32")["atol"] * max(1.0, row["ref_max_abs"])
        assert row["max_abs_diff_vs_b"] <= limit, (key, row["max_abs_diff_vs_b"])
        assert row["max_abs_diff_vs_f64"] <= limit, (key, row["max_abs_diff_vs_f64"])
        if not key.startswith("a"):
            assert row["max_abs_diff_vs_f64"] > 0, key  # float32 rows are not float64: the check compares
    assert rows["d@2"]["note"].startswith("triton kernels + CUDA graph")  # the fast path's real code path
    assert results["tests"]["returncode"] == 0, results["tests"]
    lines = proc.stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("row "))
    table = lines[header:]  # the short table is printed last
    assert [line[:3] for line in table if line.startswith("(")] == [f"({key})" for key in "abcdef"]
