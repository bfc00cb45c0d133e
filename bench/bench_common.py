"""Shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder is on sys.path)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """Short hash of the checked-out commit of this repository, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
