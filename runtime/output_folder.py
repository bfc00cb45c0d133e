"""Output folders of ``flowturbo sample`` / ``flowturbo profile``: thin names over :mod:`flowturbo.fileio`.

Kept because ``runtime.profiling.write_profile`` and older callers use these two names; the rules
(ownership record, lock, pre-flight, staged swap, debris removal) live in :class:`flowturbo.fileio.OutputFolder`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from flowturbo.fileio import OutputFolder, check_replaceable, check_writable_target


def check_output_folder(out_dir: str | os.PathLike[str], marker: str, kind: str) -> Path:
    """Refuse ``out_dir`` unless flowturbo could write it and may replace it (``marker`` is no longer proof).

    A folder is replaceable only when every entry in it is listed in flowturbo's ownership record; a file
    named ``marker`` (e.g. ``run.json``) beside a user's own files does not make it a ``kind``.
    """
    out = check_writable_target(out_dir)
    check_replaceable(out, kind)
    return out


@contextlib.contextmanager
def staged_output_folder(out: Path, command: str = "output") -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it replaces ``out`` (see OutputFolder)."""
    with OutputFolder(out, command=command) as folder, folder.staging() as staging:
        yield staging


__all__ = ["check_output_folder", "staged_output_folder"]
