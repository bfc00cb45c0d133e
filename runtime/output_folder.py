"""Output folders written atomically (``flowturbo sample``, ``flowturbo profile``).

A command builds its output in a temporary sibling folder and renames it into place only when complete; a
previous output of the same command (recognised by its marker file) is replaced, anything else is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flowturbo.errors import FlowTurboError


def check_output_folder(out_dir: str | os.PathLike[str], marker: str, kind: str) -> Path:
    """Refuse ``out_dir`` when it is a file, or a non-empty folder without ``marker`` (not a previous ``kind``)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FlowTurboError(f"--out {out} exists and is not a folder; choose another path")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise FlowTurboError(f"--out {out} is a non-empty folder that is not a {kind}; choose another")
    return out


@contextlib.contextmanager
def staged_output_folder(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success it replaces ``out`` (restored if that fails).

    On an error nothing is left behind and an existing ``out`` is untouched. Check ``out`` with
    :func:`check_output_folder` first.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the output folder gets normal permissions
        yield staging
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(aside / out.name, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = ["check_output_folder", "staged_output_folder"]
