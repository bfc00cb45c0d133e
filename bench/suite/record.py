"""The GPU suite's record: one JSON per phase, written after every entry, merged across phases.

Torch-free on purpose: the record must be writable before anything heavy imports (and after anything fails).

Files under ``--out`` (the device tool brings back at most 8 files; the suite writes at most 7):

* ``phase<N>.json``   this phase's results, rewritten atomically after every row / task / check;
* ``gpu_suite.json``  the merge of every phase found in the state folder (earlier phases of the same machine
  lend) and this one — the file to commit;
* ``suite.log``       every log line of this phase (what the terminal shows);
* ``errors.log``      one traceback per failure, headed by where it happened (absent when nothing failed);
* ``build.log``       the build's output (phase that built only);
* ``gpu_tests.log`` / ``kernels.json``  phase 3's pytest output and kernel bench (when they ran); row (t) is in
  the JSON (``text_row``, ``text_rows``), not a file of its own.

The state folder (``--state-dir``, default ``/tmp/flowturbo_gpu_suite``) survives between the device tool's
calls while the machine stays warm; a cold machine starts with an empty one, and each phase still writes
its own complete JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PHASE_FILE = "phase{}.json"
MERGED_FILE = "gpu_suite.json"
SUITE_LOG = "suite.log"
ERRORS_LOG = "errors.log"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


class Recorder:
    """This phase's results; every change is written to disk at once (a kill loses at most the entry in flight).

    ``results`` layout: ``rows`` {"b@8": {...}}, ``tasks`` {name: {"status": "ok" | "error" | "skipped", ...}},
    ``preflight`` {check: {...}}, ``errors`` {where: "Type: message"}, ``skipped`` {what: reason}, plus the
    scalar facts (config, environment, build, ...).
    """

    def __init__(self, out: Path, phase: str, state_dir: Path | None, header: dict[str, Any]) -> None:
        self.out = out
        self.phase = phase
        self.state_dir = state_dir
        self.out.mkdir(parents=True, exist_ok=True)
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        self.path = out / PHASE_FILE.format(phase)
        self.results: dict[str, Any] = {"phase": phase, "rows": {}, "tasks": {}, "preflight": {}, "errors": {},
                                        "skipped": {}, **header}
        self.save()

    @classmethod
    def resume(cls, out: Path, phase: str, state_dir: Path | None) -> "Recorder":
        """Continue the record this phase wrote before re-executing itself (after the build)."""
        path = out / PHASE_FILE.format(phase)
        recorder = cls.__new__(cls)
        recorder.out, recorder.phase, recorder.state_dir, recorder.path = out, phase, state_dir, path
        recorder.results = json.loads(path.read_text())
        recorder.results["resumed_after_build"] = True
        recorder.save()
        return recorder

    # ------------------------------------------------------------------------------------------ writing
    def save(self) -> None:
        """Write this phase's JSON, its copy in the state folder, and the merged ``gpu_suite.json``."""
        self.results["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        text = _dumps(self.results)
        atomic_write_text(self.path, text)
        phases = [self.results]
        if self.state_dir is not None:
            atomic_write_text(self.state_dir / self.path.name, text)
            phases = load_phases(sorted(self.state_dir.glob(PHASE_FILE.format("*"))))
        atomic_write_text(self.out / MERGED_FILE, _dumps(merge_phases(phases)))

    def set(self, key: str, value: Any) -> None:
        self.results[key] = value
        self.save()

    def update(self, key: str, **values: Any) -> None:
        """Merge ``values`` into the dict entry ``key``."""
        self.results.setdefault(key, {}).update(values)
        self.save()

    def row(self, key: str, entry: dict[str, Any]) -> None:
        self.results["rows"][key] = {**entry, "phase": self.phase}
        self.save()

    def task(self, name: str, status: str, **details: Any) -> None:
        self.results["tasks"][name] = {"status": status, **details}
        self.save()

    def skip(self, what: str, reason: str) -> None:
        self.results["skipped"][what] = reason
        self.save()
        self.log(f"skipped {what}: {reason}")

    def error(self, where: str, message: str, traceback_text: str | None = None) -> None:
        """Record a failure: one line in the JSON, the traceback appended to ``errors.log``."""
        self.results["errors"][where] = message
        self.save()
        with open(self.out / ERRORS_LOG, "a") as handle:
            handle.write(f"===== phase {self.phase} · {where} · {time.strftime('%H:%M:%S')}\n{message}\n")
            if traceback_text:
                handle.write(traceback_text.rstrip() + "\n")
        self.log(f"error in {where}: {message.splitlines()[0] if message else ''}")

    def log(self, message: str) -> None:
        """Print one line (flushed) and append it to ``suite.log``."""
        line = f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(self.out / SUITE_LOG, "a") as handle:
            handle.write(line + "\n")

    def append_log(self, title: str, text: str, limit: int = 20_000) -> None:
        """Append a subprocess's output (its last ``limit`` characters) to ``suite.log``."""
        with open(self.out / SUITE_LOG, "a") as handle:
            handle.write(f"----- {title}\n{text[-limit:].rstrip()}\n----- end of {title}\n")


# ---------------------------------------------------------------------------------------------- merging
def load_phases(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Phase records from JSON files (unreadable ones are reported inside the merge, not raised)."""
    phases = []
    for path in paths:
        try:
            phases.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            phases.append({"phase": f"unreadable {path}", "errors": {f"merge:{path}": str(exc)}})
    return phases


def merge_phases(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from several phases' records (phase order).

    Rows keep their key from the first phase that measured them; a later phase's re-measurement of the same
    key (each phase re-runs the reference row (b) as its own baseline) is kept as ``key~p<phase>``. Errors,
    skips, tasks and pre-flight checks are prefixed with their phase. Ratios are recomputed from the merged
    rows, each also normalised by the row-(b) of the row's own phase.
    """
    phases = sorted(phases, key=lambda p: str(p.get("phase")))
    merged: dict[str, Any] = {"phases": [p.get("phase") for p in phases], "rows": {}, "errors": {}, "skipped": {},
                              "tasks": {}, "preflight": {}}
    for phase in phases:
        name = phase.get("phase")
        for key, entry in phase.get("rows", {}).items():
            merged["rows"][key if key not in merged["rows"] else f"{key}~p{name}"] = entry
        for section in ("errors", "skipped", "tasks", "preflight"):
            for key, value in phase.get(section, {}).items():
                merged[section][f"p{name}:{key}"] = value
        for key, value in phase.items():
            if key not in merged and key not in ("phase", "rows", "errors", "skipped", "tasks", "preflight"):
                merged[key] = value  # first phase wins for shared facts (environment, config)
            elif key in ("build", "environment") and key in merged and merged[key] != value:
                merged.setdefault(f"{key}_by_phase", {})[str(name)] = value
    merged["ratios"] = ratios(merged["rows"])
    return merged


def _ms(rows: dict[str, Any], key: str, batch: int) -> float | None:
    entry = rows.get(f"{key}@{batch}")
    return None if entry is None or entry.get("valid") is False else entry.get("ms_per_image")


def _over_own_b(rows: dict[str, Any], key: str, batch: int) -> float | None:
    """Row ``key``'s time over the row (b) measured in the same phase (the cross-phase-safe ratio)."""
    entry = rows.get(f"{key}@{batch}")
    if entry is None or entry.get("valid") is False:
        return None
    for candidate, b in rows.items():
        if candidate.startswith(f"b@{batch}") and b.get("phase") == entry.get("phase"):
            return entry["ms_per_image"] / b["ms_per_image"]
    return None


def ratios(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as numbers per batch: d/c (<= 0.9), b/d (>= 1.6 at 8), e/d (<= 1 at 1).

    ``*_normalised`` divides each row by its own phase's row (b) first, so rows measured in different phases
    compare through their baselines."""
    batches = sorted({int(k.split("@")[1].split("~")[0]) for k in rows if "@" in k})
    out: dict[str, Any] = {}
    for batch in batches:
        d, c, b, e = (_ms(rows, k, batch) for k in "dcbe")
        nd, nc, ne = (_over_own_b(rows, k, batch) for k in "dce")
        out[str(batch)] = {
            "d_over_c": None if None in (d, c) else d / c,
            "b_over_d": None if None in (b, d) else b / d,
            "e_over_d": None if None in (e, d) else e / d,
            "d_over_c_normalised": None if None in (nd, nc) else nd / nc,
            "e_over_d_normalised": None if None in (ne, nd) else ne / nd,
        }
    return out


# ---------------------------------------------------------------------------------------------- report
def short_table(results: dict[str, Any]) -> str:
    """The table printed last: one line per row, the ratios, then every skip and error in one line each."""
    lines = [f"{'row':<48}{'batch':>6}{'ms/img':>10}{'build s':>9}{'max|dz| vs b':>14}{'vs f64':>10}  note"]
    rows = results.get("rows", {})
    for key, entry in sorted(rows.items(), key=lambda kv: (kv[1].get("batch", 0), kv[0])):
        diff, diff64 = entry.get("max_abs_diff_vs_b"), entry.get("max_abs_diff_vs_f64")
        suffix = "@" + str(entry.get("batch", 0))
        label = f"({key.replace(suffix, '')}) {entry.get('row', '')}"  # "(b) ...", "(b~p2) ..."
        lines.append(f"{label[:47]:<48}{entry.get('batch', 0):>6}{entry.get('ms_per_image', float('nan')):>10.3f}"
                     f"{entry.get('build_s', 0.0):>9.1f}"
                     f"{f'{diff:>14.3g}' if diff is not None else ' ' * 14}"
                     f"{f'{diff64:>10.3g}' if diff64 is not None else ' ' * 10}  {entry.get('note', '')[:60]}")
    text_rows = results.get("text_rows") or {}
    if text_rows:  # row (t): schedules side by side, one image (CFG: transformer batch 2)
        about = results.get("text_row") or {}
        lines.append(f"(t) {about.get('row', 'text-to-image')}: {about.get('model', '')}, {about.get('image', '')}, "
                     f"{about.get('dtype', '')}, build {about.get('build_s', 0.0):.1f} s")
        for key, entry in sorted(text_rows.items(), key=lambda kv: kv[1].get("order", 0)):
            extra = "".join(f", {label} {entry[name]:.2f}x" for name, label in
                            (("speedup_vs_E28", "vs E28"), ("speedup_vs_unfused", "vs unfused")) if name in entry)
            if "max_abs_diff_vs_unfused" in entry:
                extra += f", max|dz| vs unfused {entry['max_abs_diff_vs_unfused']:.3g}"
            pad = " " * max(1, 16 - len(key))
            lines.append(f"  ({key}){pad}{entry.get('calls', 0):>3} calls "
                         f"{entry.get('ms_per_image', float('nan')):>10.2f} ms/img "
                         f"{entry.get('ms_per_call', float('nan')):>8.2f} ms/call{extra}")
    for batch, ratio in (results.get("ratios") or ratios(rows)).items():
        text = ", ".join(f"{k}={v:.3f}" for k, v in ratio.items() if v is not None) or "no pairs"
        lines.append(f"batch {batch}: {text}")
    lines.append("targets: d_over_c <= 0.9 (batches 1 and 8), b_over_d >= 1.6 at 8, e_over_d <= 1 at 1")
    for name, task in sorted(results.get("tasks", {}).items()):
        bare = name.split(":", 1)[1] if name.startswith("p") and ":" in name else name  # merged: "p1:user:sample"
        if task.get("status") != "ok" or bare.startswith(("user:", "tests", "kernel_bench", "export")):
            detail = task.get("summary") or task.get("reason") or task.get("execution") or ""
            lines.append(f"task {name}: {task.get('status')} {str(detail)[:100]}")
    for what in ("skipped", "errors"):
        for key, reason in results.get(what, {}).items():
            lines.append(f"{'skipped' if what == 'skipped' else 'error'} {key}: {str(reason).splitlines()[0][:150]}")
    return "\n".join(lines)


__all__ = ["ERRORS_LOG", "MERGED_FILE", "PHASE_FILE", "Recorder", "SUITE_LOG", "atomic_write_text", "load_phases",
           "merge_phases", "ratios", "short_table"]
