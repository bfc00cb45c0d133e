"""Checks the command-line tests share: one `error:` line, and a folder left byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path


def one_error_line(capsys, *needles: str) -> str:
    """The captured stderr is exactly one `error:` line (no traceback) holding every one of ``needles``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``, hidden ones too (byte-for-byte comparison)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
