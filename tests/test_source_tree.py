"""Run from the repository, the layer folders (``kernels/``, ...) must not shadow installed packages of the same name:
transformers >= 5.25 imports the PyPI package ``kernels`` when diffusers loads a pipeline (flowturbo/_source_tree.py)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import_from_repo_root(code: str) -> str:
    """Run ``code`` in a fresh interpreter whose path starts with the repository root (as ``python -m`` from it)."""
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_installed_kernels_package_wins_over_the_layer_folder_once_flowturbo_is_imported():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed here (transformers < 5.25): nothing to shadow")
    found = _import_from_repo_root("import flowturbo, kernels, flowturbo.kernels as ours; "
                                   "print(kernels.__file__); print(ours.__file__)").splitlines()
    assert not Path(found[0]).is_relative_to(REPO / "kernels"), found  # the installed distribution
    assert Path(found[1]).resolve() == (REPO / "kernels" / "__init__.py").resolve()  # flowturbo's layer is ours


def test_without_an_installed_package_of_that_name_nothing_changes():
    """A layer name with no installed distribution (``training``) still resolves as before (the finder steps aside)."""
    out = _import_from_repo_root("import flowturbo, importlib.util; spec = importlib.util.find_spec('training'); "
                                 "print(spec.origin if spec else None)")
    assert out == str(REPO / "training" / "__init__.py")
