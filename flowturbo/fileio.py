"""File safety for every flowturbo command that writes: the one place that touches the disk for output.

Pure Python (no torch), importable from every layer. It gives each writer (``sample``, ``profile``,
``export``, ``train``, ``eval``) the same guarantees:

* **Atomic files** (:func:`atomic_write_bytes` / ``_text`` / ``_json``, :func:`atomic_path`): the data goes to a
  temporary file in the same folder, is flushed and ``fsync``-ed, then ``os.replace``-d over the target, so a
  reader (or a crash) sees the complete old file or the complete new one, never half of one.
* **Staged output folders** (:class:`OutputFolder`): a command writes into a hidden staging folder beside its
  target, ``.NAME.flowturbo-tmp-PID-XXXX``, and swaps it into place only when complete (an atomic exchange
  where the kernel offers ``renameat2(RENAME_EXCHANGE)``, else rename aside + rename + restore on failure).
* **Ownership records**: every folder flowturbo creates holds ``.flowturbo-owned.json`` listing every file
  flowturbo wrote there, the command that wrote them and the folder's *kind* (:data:`KINDS`: a sample-like
  output of ``sample`` / ``inpaint`` / ``edit`` / ``profile``, an export, a tune output, an eval result, a
  training run, a bundle). An existing folder is replaced (or, for training runs, written into) only if every
  entry in it is listed in that record; anything else is refused with an error naming the unknown entries, so
  a user's ``thesis.txt`` beside a ``run.json`` survives byte for byte.
* **The kinds rule** (:func:`check_kind`): a command replaces only a folder of its own kind, and writes into a
  training run only as the ``train`` command of that run (resume / force); a bundle, an export or a training
  run is never replaced by another command, whatever flag is given. A record from an older flowturbo names no
  kind: it is inferred from the command it names, else from the files (``manifest.json``: an export;
  ``checkpoints/``: a training run; ``config.json`` + ``predictor.safetensors``: a bundle; ...), and a folder
  whose kind cannot be told is refused.
* **The input rule** (:func:`check_apart`): a command's output path (``--out``; ``tune``'s ``--export`` and
  ``--cache``) that is, contains or lies inside one of its input paths, or another of its outputs, is refused
  before any work, naming both (symlinks resolved for the comparison).
* **No writing through links**: a symbolic link given as an output path is refused, naming where it points
  (:func:`check_writable_target`); links among its parent folders are followed, as the kernel does.
* **Disk full** (``ENOSPC`` / quota) while a staged folder is written ends in one :class:`FlowTurboError`
  naming the target; the staging folder is removed and the previous content stays.
* **A lock per target** (:func:`lock_target`): an advisory ``flock`` on ``.NAME.flowturbo-lock`` beside the
  target. A second writer fails at once with "another flowturbo process (pid N) is writing DIR", or waits
  (``--wait``). The lock file is removed when released.
* **Pre-flight** (:func:`check_writable_target`): the target's parent must be creatable and writable (checked by
  creating and removing a probe file) and an existing target must be replaceable (not immutable), before any
  work starts, so a bad ``--out`` costs nothing.
* **Debris removal**: staging / set-aside folders and temporary files left by a process that is gone (SIGKILL,
  power loss) are removed by the next run on the same target, under its lock. Only names that flowturbo gives
  (``.NAME.flowturbo-tmp-PID-HEX`` with the owner's pid) qualify; a set-aside folder holding anything its own
  record does not list is left alone, and so is every other folder (a user's ``.NAME.old-backup`` survives).
* **One spelling of a target**: every step (pre-flight, lock, staging, debris, swap) works on
  :func:`resolve_target` of the path (symlinks of its parent resolved, as the kernel would); a path the kernel
  cannot follow (``a/../x`` with ``a`` missing) is refused by the pre-flight, before any work.
* **Checksums**: :func:`sha256_file`.
* **Permissions**: folders ``0o777 & ~umask`` (0755 under the usual umask 022), files ``0o666 & ~umask`` (0644).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowturbo.errors import FlowTurboError

OWNERSHIP_FILE = ".flowturbo-owned.json"
OWNERSHIP_FORMAT = "flowturbo.owned/1"
LOCK_SUFFIX = ".flowturbo-lock"
STAGING_TAG = "flowturbo-tmp"  # .NAME.flowturbo-tmp-PID-XXXX: a folder being built
ASIDE_TAG = "flowturbo-old"  # .NAME.flowturbo-old-PID-XXXX: an old folder moved aside during a swap
TEMP_FILE_SUFFIX = ".flowturbo-tmp"  # .FILE.PID.XXXX.flowturbo-tmp: a file being written atomically
HASH_CHUNK_BYTES = 1 << 20
MAX_NAMED_ENTRIES = 5  # unknown entries named in an error message
RENAME_EXCHANGE = 2  # linux/fs.h
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that the file system has no room for
AT_FDCWD = -100
# FS_IOC_GETFLAGS (linux/fs.h) and the inode flags that make a folder impossible to rename or replace.
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20

KILL_AT_ENV = "FLOWTURBO_TEST_KILL_AT"  # crash-safety tests: SIGKILL this process at the named point
NO_EXCHANGE_ENV = "FLOWTURBO_TEST_NO_EXCHANGE"  # crash-safety tests: swap by rename-aside (the portable path)

# Folders of older flowturbo releases (.NAME.tmp-XXXX, .NAME.old-XXXX: no owner pid in the name) are NOT removed:
# their names cannot be told apart from a user's own (.NAME.old-backup), and "never remove what flowturbo did not
# write" wins over tidiness.


_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this very process at ``name`` when ``$FLOWTURBO_TEST_KILL_AT`` is ``name`` (or
    ``name#N``: at its N-th visit; ``name@TERM``: send SIGTERM instead, as ``kill PID`` or torchrun would).

    The crash-safety tests (``tests/test_crash_safety.py``) use it to kill ``sample`` / ``export`` / ``train``
    subprocesses at exact points (lock held, file written but not renamed, folder staged, checkpoint staged)
    instead of guessing them with timers. Unset (always, outside those tests), it does nothing.
    """
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted:
        return
    wanted, _, how = wanted.partition("@")
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


# ------------------------------------------------------------------------------------------ modes
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def folder_mode() -> int:
    """Mode of the folders flowturbo creates: ``0o777`` less the umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def file_mode() -> int:
    """Mode of the files flowturbo creates: ``0o666`` less the umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


# --------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys and no NaN: the form that content keys are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


KEY_HEX_DIGITS = 16


def artifact_key(fields: Any) -> str:
    """First 16 hex digits of the SHA-256 of :func:`canonical_json` of ``fields`` (an export directory's key:
    written by ``flowturbo.export``, re-derived by ``flowturbo.runtime.artifacts`` to check a manifest)."""
    return sha256_bytes(canonical_json(dict(fields)).encode())[:KEY_HEX_DIGITS]


# ------------------------------------------------------------------------------------ atomic files
def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_FILE_SUFFIX}")


def _os_error(exc: OSError, what: str, path: Path) -> FlowTurboError:
    reason = exc.strerror or str(exc)
    return FlowTurboError(f"cannot {what} {path}: {reason}; check the path and its permissions, or choose another")


def make_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """``mkdir -p`` with normal permissions; returns the folders it created, outermost first."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _os_error(exc, "create the folder", path) from None
        created.append(path)
    return created


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, record: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is fsync-ed and renamed onto ``path``.

    For writers that want a file name (``torch.save``, PIL, ``safetensors.save_file``). On an exception the
    temporary file is removed and ``path`` is untouched. ``record``: a folder whose ownership record gets
    ``path`` added (see :func:`add_owned`).
    """
    path = Path(path)
    make_folders(path.parent)
    tmp = _temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FlowTurboError(f"internal error: nothing was written to {tmp} for {path}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if record is not None:
        add_owned(record, [path])


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       record: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + ``os.replace``)."""
    path = Path(path)
    make_folders(path.parent)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point("file-written")
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise _os_error(exc, "write", path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if record is not None:
        add_owned(record, [path])
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *,
                      record: str | os.PathLike[str] | None = None) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), record=record)


def json_text(obj: Any) -> str:
    """The JSON flowturbo writes: sorted keys, 2-space indent, ASCII only, no NaN, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *,
                      record: str | os.PathLike[str] | None = None) -> Path:
    """Write ``obj`` as indented JSON (:func:`json_text`) atomically."""
    return atomic_write_text(path, json_text(obj), record=record)


# ------------------------------------------------------------------------------------- sealed JSON
SEAL_KEY = "manifest_sha256"
_SEAL_HEAD = b'{\n  "' + SEAL_KEY.encode() + b'": "'
_SEAL_TAIL = b'",\n'
_SEAL_DIGITS = 64


class SealError(FlowTurboError):
    """A sealed JSON file that is unsealed, malformed, or whose content no longer matches its seal."""


def sealed_json_bytes(obj: dict[str, Any]) -> bytes:
    """``obj`` as a sealed JSON document: :func:`json_text` of ``obj`` with a first member holding its digest.

    The canonical form is ``body = json_text(obj)`` (sorted keys, 2-space indent, ASCII, no NaN, trailing
    newline). The file is ``{`` + newline + ``  "manifest_sha256": "<SHA-256 of body>",`` + newline + ``body``
    without its first two bytes (``{`` and newline). A reader takes the bytes after the seal line, puts
    ``{`` + newline back in front, hashes them and compares: any edit of the content (a value, a removed entry,
    even whitespace) is detected. The C++ reader (``runtime/csrc/manifest.cpp``) does exactly the same on the
    bytes, so both sides agree without re-serialising JSON.
    """
    if not isinstance(obj, dict) or not obj:
        raise FlowTurboError("internal error: a sealed JSON document must be a non-empty object")
    if SEAL_KEY in obj:
        raise FlowTurboError(f"internal error: {SEAL_KEY!r} is reserved for the seal")
    body = json_text(obj).encode("ascii")
    return _SEAL_HEAD + sha256_bytes(body).encode() + _SEAL_TAIL + body[2:]


def read_sealed_json(path: str | os.PathLike[str], *, fix: str) -> dict[str, Any]:
    """Read a file written from :func:`sealed_json_bytes`; refuse (SealError, ending with ``fix``) any edit."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SealError(f"cannot read {path} ({exc.strerror or exc}); {fix}") from None
    head_end = len(_SEAL_HEAD) + _SEAL_DIGITS
    digest = raw[len(_SEAL_HEAD):head_end]
    if (not raw.startswith(_SEAL_HEAD) or raw[head_end:head_end + len(_SEAL_TAIL)] != _SEAL_TAIL
            or not re.fullmatch(rb"[0-9a-f]{64}", digest)):
        raise SealError(
            f"{path} carries no {SEAL_KEY} seal on its first member (written by an older flowturbo, or edited / "
            f"reformatted by hand), so its content cannot be trusted; {fix}"
        )
    body = b"{\n" + raw[head_end + len(_SEAL_TAIL):]
    if sha256_bytes(body) != digest.decode():
        raise SealError(
            f"{path} was modified after it was written: its content no longer matches its {SEAL_KEY} seal (a hand "
            f"edit of a value such as the batch range or precision, or a removed entry, is refused); {fix}"
        )
    try:
        data = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SealError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise SealError(f"{path} does not hold a JSON object; {fix}")
    return data


# -------------------------------------------------------------------------------- ownership records
# The kinds of output folders (the ``kind`` of an ownership record) and the commands that write each.
KIND_SAMPLE = "sample"  # sample / inpaint / edit / profile: cheap to redo, they replace one another
KIND_EXPORT = "export"
KIND_TUNE = "tune"
KIND_EVAL = "eval"
KIND_TRAINING_RUN = "training run"
KIND_BUNDLE = "bundle"
KINDS = {
    KIND_SAMPLE: "sample-like output (of sample / inpaint / edit / profile)",
    KIND_EXPORT: "export directory",
    KIND_TUNE: "tune output",
    KIND_EVAL: "eval result",
    KIND_TRAINING_RUN: "training run",
    KIND_BUNDLE: "model bundle",
}
COMMAND_KINDS = {
    "sample": KIND_SAMPLE, "inpaint": KIND_SAMPLE, "edit": KIND_SAMPLE, "profile": KIND_SAMPLE,
    "export": KIND_EXPORT, "tune": KIND_TUNE, "eval": KIND_EVAL, "train package": KIND_BUNDLE,
    "train autoencoder": KIND_TRAINING_RUN, "train predictor": KIND_TRAINING_RUN, "train refiner": KIND_TRAINING_RUN,
}
# A record of an older flowturbo names no kind (and may name no command): the files tell, first match wins.
_KIND_EVIDENCE = (
    (KIND_EXPORT, ("manifest.json",)),
    (KIND_TRAINING_RUN, ("checkpoints/latest",)),
    (KIND_BUNDLE, ("config.json", "predictor.safetensors")),
    (KIND_TUNE, ("tune.json",)),
    (KIND_SAMPLE, ("run.json",)),
    (KIND_SAMPLE, ("profile.json",)),
    (KIND_TRAINING_RUN, ("latents.pt",)),  # a run before its first checkpoint: its encoded dataset ...
    (KIND_TRAINING_RUN, ("config.json",)),  # ... or its config (a bundle's config.json has its weights beside it)
)


def kind_of_command(command: str) -> str:
    """The kind of output ``command`` writes (:data:`COMMAND_KINDS`; another command name is its own kind)."""
    return COMMAND_KINDS.get(command, command)


def describe_kind(kind: str | None) -> str:
    """``kind`` in words (``"model bundle"``, ...)."""
    return KINDS.get(kind or "", f"{kind!r} output" if kind else "output of an unknown kind")


@dataclass(frozen=True)
class OwnershipRecord:
    """What flowturbo wrote into a folder: relative POSIX paths of files, the command that wrote them and the
    folder's kind (:data:`KINDS`; empty in records of older flowturbo releases, see :func:`folder_kind`)."""

    files: frozenset[str]
    command: str = ""
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = {"format": OWNERSHIP_FORMAT, "command": self.command, "files": sorted(self.files)}
        if self.kind:
            data["kind"] = self.kind
        return data


def read_ownership(folder: str | os.PathLike[str]) -> OwnershipRecord | None:
    """The folder's ownership record, or None when it has none (or an unreadable one)."""
    path = Path(folder) / OWNERSHIP_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != OWNERSHIP_FORMAT or not isinstance(data.get("files"), list):
        return None
    files = frozenset(f for f in data["files"] if isinstance(f, str))
    kind = data.get("kind")
    return OwnershipRecord(files, str(data.get("command", "")), kind if isinstance(kind, str) else "")


def write_ownership(folder: str | os.PathLike[str], files: Iterable[str], command: str = "",
                    kind: str | None = None) -> Path:
    """(Re)write ``folder``'s ownership record listing ``files`` (paths relative to ``folder``); ``kind``
    defaults to the kind of ``command`` (none without a command)."""
    if kind is None:
        kind = kind_of_command(command) if command else ""
    record = OwnershipRecord(frozenset(files) - {OWNERSHIP_FILE}, command, kind)
    return atomic_write_json(Path(folder) / OWNERSHIP_FILE, record.to_dict())


def folder_kind(folder: str | os.PathLike[str], record: OwnershipRecord | None = None) -> str | None:
    """The kind of the flowturbo output ``folder``: its record's ``kind``; for a record of an older flowturbo,
    the kind of the command it names, else what its files show (:data:`_KIND_EVIDENCE`); None when it has no
    record or the kind cannot be told."""
    record = record if record is not None else read_ownership(folder)
    if record is None:
        return None
    if record.kind:
        return record.kind
    if record.command:
        return kind_of_command(record.command)
    for kind, evidence in _KIND_EVIDENCE:
        if all(name in record.files for name in evidence):
            return kind
    return None


def check_kind(target: str | os.PathLike[str], *, command: str | None = None, kind: str | None = None,
               flag: str = "--out") -> None:
    """Refuse writing ``command``'s output (or an output of ``kind``) at ``target`` when ``target`` is a flowturbo
    output of another kind (the kinds rule, see the module docstring).

    A folder of the same kind passes (what else it holds is :func:`check_replaceable`'s business); a training run
    passes only for the ``train`` command that wrote it. A folder without a record is left to
    :func:`check_replaceable` (refused unless empty); one with a record whose kind cannot be told is refused.
    """
    target = Path(target)
    if not target.is_dir() or target.is_symlink():
        return
    record = read_ownership(target)
    if record is None:
        return
    wanted = kind if kind is not None else kind_of_command(command or "")
    found = folder_kind(target, record)
    by = f" (written by `flowturbo {record.command}`)" if record.command else ""
    doer = (f"`flowturbo {command}`" if command else
            "the trainer" if wanted == KIND_TRAINING_RUN else f"a writer of {describe_kind(wanted)}")
    if found is None:
        raise FlowTurboError(
            f"refusing to write {flag} {target}: it is a flowturbo output whose record (from an older flowturbo) "
            f"does not say which kind of output it is, and its files do not tell; move it away or choose another "
            f"{flag}"
        )
    if found != wanted:
        never = (" (a bundle, an export or a training run is never replaced by another command, whatever flag is "
                 "given)" if found in (KIND_BUNDLE, KIND_EXPORT, KIND_TRAINING_RUN) else "")
        does = "writes only into" if wanted == KIND_TRAINING_RUN else "replaces only"
        it = _a("flowturbo " + describe_kind(found))
        raise FlowTurboError(
            f"refusing to write {flag} {target}: it is {it}{by}, and {doer} {does} {_a(describe_kind(wanted))}{never}; "
            f"choose another {flag}"
        )
    if wanted == KIND_TRAINING_RUN and command and record.command and record.command != command:
        raise FlowTurboError(
            f"refusing to write {flag} {target}: it is the training run of `flowturbo {record.command}`, and "
            f"`flowturbo {command}` writes only into its own runs; choose another {flag}"
        )


def _a(noun: str) -> str:
    """``a flowturbo bundle`` / ``an export directory`` (the article for ``noun``)."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_apart(outputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
                inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """The input rule: refuse an output path that is, contains or lies inside one of the input paths, or another
    of the outputs, naming both.

    ``outputs`` / ``inputs``: ``(flag, path)`` pairs (a None path is skipped; so is an input that does not
    exist: it cannot be lost). Paths are compared with every symlink resolved, so a link to an input is that
    input. Call it before any work.
    """
    outs = [(flag, path, _real(path), True) for flag, path in outputs if path is not None]
    ins = [(flag, path, _real(path), False) for flag, path in inputs if path is not None and os.path.lexists(path)]
    for i, (out_flag, out, out_real, _) in enumerate(outs):
        for other_flag, other, other_real, is_output in outs[i + 1:] + ins:
            if out_real == other_real:
                relation = "is"
            elif out_real in other_real.parents:
                relation = "contains"
            elif other_real in out_real.parents:
                relation = "lies inside"
            else:
                continue
            resolved = ("" if (str(out_real), str(other_real)) == (os.path.abspath(out), os.path.abspath(other))
                        else f" (links resolved: {out_real} and {other_real})")
            why = ("two outputs of one command cannot share a folder" if is_output
                   else "writing it would replace or change an input this command reads")
            raise FlowTurboError(f"{out_flag} {out} {relation} {other_flag} {other}{resolved}: {why}; choose an "
                                 f"{out_flag} outside {other_flag}")



def _relative(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``path`` relative to ``folder`` as a POSIX path; both are taken as the OS does (relative: to the cwd)."""
    folder_abs, path_abs = os.path.abspath(folder), os.path.abspath(path)
    try:
        return Path(path_abs).relative_to(folder_abs).as_posix()
    except ValueError:
        return os.path.relpath(path_abs, folder_abs).replace(os.sep, "/")


def _locked_ancestor(folder: Path) -> Path | None:
    """The nearest proper ancestor of ``folder`` whose lock this process holds (a target it is writing), or None."""
    here = resolve_target(folder)
    with _held_lock:
        held = set(_held)
    for ancestor in here.parents:
        if ancestor.name and str(lock_path_for(ancestor)) in held:
            return ancestor
    return None


def add_owned(folder: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]], command: str = "",
              kind: str | None = None) -> None:
    """Add ``paths`` (paths as the OS reads them: absolute, or relative to the working folder, e.g.
    ``folder / "x"``) to ``folder``'s ownership record (created if absent; ``kind`` names the kind of a new
    record, see :func:`write_ownership`).

    A record inside a target this process is writing (holds the lock of) is listed in that target's record in
    turn, so the target's record vouches for it (see :func:`unknown_entries`): a training run's
    stage folders are its own, a copied-in flowturbo output is not.
    """
    folder = Path(folder)
    old = read_ownership(folder)
    new = {_relative(folder, p) for p in paths}
    files = (old.files if old else frozenset()) | new
    if old is None or not new <= old.files:
        kind = (old.kind or None) if old else kind
        write_ownership(folder, files, command or (old.command if old else ""), kind=kind)
    ancestor = _locked_ancestor(folder)  # (also for a record an older flowturbo left unlisted: resumed runs)
    if ancestor is not None:
        add_owned(ancestor, [resolve_target(folder) / OWNERSHIP_FILE])


def remove_owned(folder: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> None:
    """Drop ``paths`` (files flowturbo deleted) from ``folder``'s ownership record."""
    folder = Path(folder)
    old = read_ownership(folder)
    if old is None:
        return
    gone = {_relative(folder, p) for p in paths}
    keep = {f for f in old.files if not any(f == g or f.startswith(g.rstrip("/") + "/") for g in gone)}
    if keep != old.files:
        write_ownership(folder, keep, old.command, kind=old.kind or None)


def list_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every file (and symlink) below ``folder``, as sorted relative POSIX paths."""
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        found += [(here / name).relative_to(root).as_posix() for name in filenames]
        found += [(here / name).relative_to(root).as_posix() for name in dirnames if (here / name).is_symlink()]
    return sorted(found)


def unknown_entries(folder: str | os.PathLike[str]) -> list[str]:
    """Entries of ``folder`` that no flowturbo ownership record lists (relative paths, sorted).

    A subfolder's own record counts only when the record above it lists that record (``sub/`` +
    ``.flowturbo-owned.json``): flowturbo wrote the subfolder as part of this folder. A flowturbo output that
    was copied or moved in is not vouched for, so it is unknown and the folder is not replaced. An empty
    subfolder counts as unknown unless a record lists a file below it (a user's empty ``photos/`` is theirs);
    so does an unreadable one. A folder without any record has only unknown entries (its top-level entries
    are returned).
    """
    root = Path(folder)
    record = read_ownership(root)
    if record is None:
        return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in root.iterdir())
    return _unknown_below(root, "", record.files | {OWNERSHIP_FILE})


def _unknown_below(folder: Path, prefix: str, listed: frozenset[str]) -> list[str]:
    """Entries below ``folder`` (named ``prefix`` + name) not in ``listed`` (paths relative to the top folder)."""
    unknown: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        rel = prefix + entry.name
        if not entry.is_dir() or entry.is_symlink():
            if rel not in listed:
                unknown.append(rel)
            continue
        below = rel + "/"
        vouched = listed
        if below + OWNERSHIP_FILE in listed:  # a nested record counts only when the record above lists it
            nested = read_ownership(entry)
            if nested is not None:
                vouched = listed | {below + f for f in nested.files}
        try:
            inner = _unknown_below(entry, below, vouched)
            empty = not any(entry.iterdir())
        except OSError:  # unreadable: cannot show it is flowturbo's, so it is not
            unknown.append(below)
            continue
        if empty and not any(f.startswith(below) for f in vouched):
            unknown.append(below)
        unknown += inner
    return unknown


def _describe_unknown(unknown: list[str]) -> str:
    named = ", ".join(repr(u) for u in unknown[:MAX_NAMED_ENTRIES])
    more = f" and {len(unknown) - MAX_NAMED_ENTRIES} more" if len(unknown) > MAX_NAMED_ENTRIES else ""
    return f"{named}{more}"


def check_replaceable(target: str | os.PathLike[str], what: str = "output", *, command: str | None = None,
                      flag: str = "--out") -> Path:
    """Refuse ``target`` unless it is absent, an empty folder, or a folder holding only what flowturbo wrote.

    ``what`` names the kind of output in the message ("sample output", "export directory", ...). With
    ``command``, the kinds rule applies first (:func:`check_kind`): a folder of another kind is refused.
    """
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return target
    if target.is_symlink():
        raise _link_error(target, flag)
    if not target.is_dir():
        raise FlowTurboError(f"{flag} {target} exists and is not a folder; choose another {flag}")
    if command is not None:
        check_kind(target, command=command, flag=flag)
    unknown = unknown_entries(target)
    if unknown:
        if read_ownership(target) is None:
            raise FlowTurboError(
                f"refusing to replace {target}: it is not a flowturbo {what} (it has no {OWNERSHIP_FILE} record of "
                f"what flowturbo wrote) and holds {_describe_unknown(unknown)}; choose another {flag}, or move "
                "those entries away"
            )
        raise FlowTurboError(
            f"refusing to replace {target}: it holds entries flowturbo did not write: {_describe_unknown(unknown)}; "
            f"move them away (or choose another {flag}) and run again"
        )
    return target


def _link_error(target: Path, flag: str) -> FlowTurboError:
    """The refusal of a symbolic link as an output path (flowturbo never writes through a link)."""
    try:
        points = os.readlink(target)
    except OSError:
        points = "?"
    real = Path(os.path.realpath(target))
    where = f"{points}" + ("" if real.exists() else ", which does not exist")
    return FlowTurboError(
        f"{flag} {target} is a symbolic link (to {where}); flowturbo does not write through links (it would replace "
        f"the link, not what it points to): pass the real path ({flag} {real}) or remove the link"
    )


# --------------------------------------------------------------------------------------------- locks
_held_lock = threading.Lock()
_held: dict[str, list[Any]] = {}  # lock path -> [fd, count]: re-entrant within one process


def resolve_target(target: str | os.PathLike[str]) -> Path:
    """The one absolute spelling of ``target`` used by every step: its parent resolved as the kernel would
    (symlinks followed, ``..`` applied), its own name kept (a symlink at ``target`` is not followed)."""
    path = Path(target)
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def lock_path_for(target: str | os.PathLike[str]) -> Path:
    """The lock file of ``target``: ``.NAME.flowturbo-lock`` beside it."""
    target = resolve_target(target)
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "pid unknown"
    return f"pid {text}" if text.isdigit() else "pid unknown"


@contextlib.contextmanager
def lock_target(target: str | os.PathLike[str], *, wait: bool = False) -> Iterator[Path]:
    """Hold the advisory lock of ``target`` (an ``flock`` on ``.NAME.flowturbo-lock`` beside it).

    Another holder makes this fail at once with "another flowturbo process (pid N) is writing TARGET", or,
    with ``wait=True``, block until it is released. The target's parent folder must exist. Re-entrant within
    a process. The lock file holds the owner's pid and is removed on release.
    """
    path = lock_path_for(target)
    key = str(path)
    with _held_lock:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_lock:
                _held[key][1] -= 1
        return
    fd = _acquire(path, Path(target), wait)
    with _held_lock:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_lock:
            _held.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before closing: a waiter that gets this inode sees it unlinked and retries
        os.close(fd)


def _acquire(path: Path, target: Path, wait: bool) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _os_error(exc, "create the lock file", path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise FlowTurboError(
                f"another flowturbo process ({_lock_holder(path)}) is writing {target}; wait for it to finish "
                "(or pass --wait to queue behind it), or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder unlinked it while we waited: lock the new file instead
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


# ------------------------------------------------------------------------------------ pre-flight
def _inode_flags(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        buf = ctypes.c_long(0)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return int(buf.value)
    except OSError:  # file system without inode flags
        return 0
    finally:
        os.close(fd)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_followable(target: Path, flag: str) -> None:
    """Refuse a ``..`` that follows a folder that does not exist (``a/../x`` with ``a`` missing): the kernel
    cannot follow it, so no step could agree on what the path means."""
    probe = Path(target.anchor or ".")
    for part in target.parts[1 if target.anchor else 0:]:
        if part == ".." and not probe.is_dir():
            raise FlowTurboError(
                f"{flag} {target}: {probe} is not an existing folder, so the '..' after it cannot be followed; "
                f"write the path without it (e.g. {os.path.normpath(target)}) or create {probe} first"
            )
        probe = probe / part


def check_writable_target(target: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Refuse, before any work, a target flowturbo could not create or replace; returns it as a Path.

    The nearest existing ancestor of the target's parent must be a folder in which a file can be created
    (probed: this catches read-only and special file systems such as ``/proc``, and missing permissions);
    an existing target must not be immutable or append-only (``chattr``) and must be writable; a ``..`` after a
    missing folder is refused; so is a target that is a symbolic link (flowturbo does not write through links).
    """
    target = Path(target)
    if target.name in ("", ".", ".."):
        raise FlowTurboError(f"{flag} {target} does not name a folder; give a path such as outputs/run1")
    if target.is_symlink():
        raise _link_error(target, flag)
    _check_followable(target, flag)
    parent = resolve_target(target).parent
    anchor = _nearest_existing(parent)
    if not anchor.is_dir():
        raise FlowTurboError(f"{flag} {target}: {anchor} is not a folder; choose another {flag}")
    probe = anchor / f".flowturbo-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise FlowTurboError(
            f"{flag} {target}: cannot write in {anchor} ({exc.strerror or exc}); choose a writable location"
        ) from None
    with contextlib.suppress(FileNotFoundError):
        probe.unlink()
    for path in ([target] if target.exists() else []) + ([parent] if parent.exists() else []):
        flags = _inode_flags(path)
        if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            kind = "immutable" if flags & FS_IMMUTABLE_FL else "append-only"
            raise FlowTurboError(
                f"{flag} {target}: {path} is {kind} (chattr), so flowturbo cannot replace it; clear the flag "
                f"(chattr -i / -a) or choose another {flag}"
            )
    if target.exists() and target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise FlowTurboError(f"{flag} {target} is not writable; fix its permissions or choose another {flag}")
    return target


# ------------------------------------------------------------------------------------------ debris
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _debris_of(target: Path) -> list[tuple[Path, str, int]]:
    """(path, kind, owner pid) of flowturbo's staging / set-aside folders beside ``target`` (names flowturbo gives)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.({STAGING_TAG}|{ASIDE_TAG})-(\d+)-[0-9a-f]+$")
    found = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    for name in names:
        match = pattern.match(name)
        if match and (target.parent / name).is_dir() and not (target.parent / name).is_symlink():
            found.append((target.parent / name, match.group(1), int(match.group(2))))
    return sorted(found)


def _aside_is_ours(path: Path) -> bool:
    """A set-aside folder is removed only if it holds nothing but what its own record lists (an old output)."""
    try:
        return read_ownership(path) is not None and not unknown_entries(path)
    except OSError:
        return False


def remove_stale_debris(target: str | os.PathLike[str]) -> list[Path]:
    """Remove staging / set-aside folders beside ``target`` whose owner process is gone; call under the lock.

    A set-aside folder whose process died between moving the old target aside and moving the new one in is
    put back when the target is missing (the old complete state wins); otherwise it is removed only when it
    holds nothing but what its own record lists. Folders of other names are never touched. Returns what was
    removed or restored.
    """
    target = resolve_target(target)
    handled = []
    for path, kind, pid in _debris_of(target):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if kind == ASIDE_TAG and not target.exists() and not target.is_symlink():
            os.replace(path, target)
        elif kind == ASIDE_TAG and not _aside_is_ours(path):
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def remove_stale_staging(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove every staging / set-aside folder directly in ``folder`` whose owner process is gone.

    (:func:`remove_stale_debris` does this for one target; this covers all targets of a folder, e.g. the
    checkpoint folders of a training run.)
    """
    pattern = re.compile(rf"^\.(.+)\.({STAGING_TAG}|{ASIDE_TAG})-(\d+)-[0-9a-f]+$")
    folder = Path(folder)
    handled = []
    names = os.listdir(folder) if folder.is_dir() else []
    for name in sorted(names):
        match = pattern.match(name)
        if match is None or _pid_alive(int(match.group(3))):
            continue
        path, target = folder / name, folder / match.group(1)
        if match.group(2) == ASIDE_TAG and not target.exists():
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files of atomic writes below ``folder`` whose writer process is gone."""
    pattern = re.compile(rf"^\..+\.(\d+)\.[0-9a-f]+{re.escape(TEMP_FILE_SUFFIX)}$")
    removed = []
    if not Path(folder).is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + dirnames:
            match = pattern.match(name)
            if match and not _pid_alive(int(match.group(1))):
                path = Path(dirpath) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------- swapping
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported here."""
    libc = _libc()
    function = getattr(libc, "renameat2", None) if libc is not None else None
    if function is None:
        return False
    result = function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def new_staging_folder(target: str | os.PathLike[str], tag: str = STAGING_TAG) -> Path:
    """Create ``.NAME.<tag>-PID-XXXX`` beside ``target`` with normal permissions."""
    target = Path(target)
    while True:
        path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise _os_error(exc, "create a staging folder beside", target) from None


def _remove_replaced(old: Path, target: Path) -> None:
    """Remove the previous content of ``target`` (now at ``old``); if that fails (an immutable file inside),
    say so in one warning line naming what is left: the new output is complete, so the run still succeeds."""
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        print(f"warning: {target} was replaced, but its previous content could not be removed completely and is "
              f"left at {old} (an immutable or unwritable file inside?); remove it by hand", file=sys.stderr)


def swap_into_place(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` at ``target``; an existing ``target`` is replaced (and removed).

    Uses an atomic exchange where available, so ``target`` always holds the complete old or the complete new
    folder; otherwise the old folder is renamed aside first and restored if the second rename fails.
    """
    try:
        if not target.exists():
            os.rename(staging, target)
            _fsync_folder(target.parent)
            return
        if os.environ.get(NO_EXCHANGE_ENV) is None and _exchange(staging, target):  # staging now holds the old one
            _fsync_folder(target.parent)
            _remove_replaced(staging, target)
            return
        aside = target.parent / f".{target.name}.{ASIDE_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, aside)
        crash_point("set-aside")
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _fsync_folder(target.parent)
        _remove_replaced(aside, target)
    except OSError as exc:
        raise FlowTurboError(
            f"cannot put the new output in place at {target} ({exc.strerror or exc}); the previous content is "
            "unchanged; check the folder's permissions and attributes (chattr) or choose another --out"
        ) from None


def _seal_permissions(folder: Path) -> None:
    """Normal permissions for everything under a staging folder (tools such as mkdtemp make 0700 / 0600)."""
    dmode, fmode = folder_mode(), file_mode()
    os.chmod(folder, dmode)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                os.chmod(path, dmode)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                mode = fmode | (stat.S_IMODE(path.stat().st_mode) & 0o111 & ~_umask())
                os.chmod(path, mode)


# ----------------------------------------------------------------------------------- output folder
class OutputFolder:
    """A command's output folder, from pre-flight to the final swap. Use as a context manager::

        with OutputFolder(args.out, command="sample", wait=args.wait) as out:   # checks + lock, before work
            images = expensive_work()
            with out.staging() as folder:                                    # hidden folder beside --out
                write(folder / "grid.png")
            # here --out holds the new folder (+ its ownership record)

    Entering: the target must be creatable and writable (:func:`check_writable_target`), replaceable
    (:func:`check_replaceable`); its lock is taken (:func:`lock_target`) and debris of dead runs removed.
    :meth:`staging` yields an empty folder; on success its ownership record is written (every file in it),
    permissions normalised, and it is swapped into place (the target is re-checked first: a user may have
    added files meanwhile). On any error nothing is left behind: no staging folder, no lock file, and no
    parent folders that this run created.
    """

    def __init__(self, target: str | os.PathLike[str], *, command: str, what: str = "output",
                 wait: bool = False, flag: str = "--out") -> None:
        self.target = Path(target)  # as the user spelled it (messages)
        self.path = resolve_target(target)  # what every step works on (see resolve_target)
        self.command = command
        self.what = what
        self.wait = wait
        self.flag = flag
        self.committed = False
        self._stack: contextlib.ExitStack | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "OutputFolder":
        check_writable_target(self.target, self.flag)
        self.path = resolve_target(self.target)
        check_replaceable(self.path, self.what, command=self.command, flag=self.flag)
        self._created = make_folders(self.path.parent)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(lock_target(self.path, wait=self.wait))
            crash_point("locked")
            remove_stale_debris(self.path)
            check_replaceable(self.path, self.what, command=self.command, flag=self.flag)  # again, under the lock
        except BaseException:
            stack.close()
            self._remove_created()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._stack is not None
        self._stack.close()
        if not self.committed:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty staging folder beside the target; swapped into place when the block succeeds."""
        if self._stack is None:
            raise FlowTurboError("internal error: OutputFolder.staging() outside its `with` block")
        folder = new_staging_folder(self.path)
        try:
            yield folder
            self.commit(folder)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            raise FlowTurboError(
                f"cannot write {self.flag} {self.target}: {exc.strerror or exc} (nothing was written: the staging "
                f"folder is removed and {self.target} keeps its previous content); free some space or choose "
                f"another {self.flag}"
            ) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def commit(self, folder: Path) -> None:
        """Record, seal and swap a complete staging ``folder`` into place (done by :meth:`staging`)."""
        write_ownership(folder, list_files(folder), self.command)
        _seal_permissions(folder)
        check_replaceable(self.path, self.what, command=self.command, flag=self.flag)
        crash_point("staged")
        swap_into_place(folder, self.path)
        self.committed = True


def prepare_output_folder(target: str | os.PathLike[str], *, command: str, what: str = "output",
                          wait: bool = False) -> OutputFolder:
    """An :class:`OutputFolder` (enter it with ``with``)."""
    return OutputFolder(target, command=command, what=what, wait=wait)


@contextlib.contextmanager
def owned_run_folder(folder: str | os.PathLike[str], *, command: str, wait: bool = False,
                     what: str = "run folder", check_owned: bool = True) -> Iterator[Path]:
    """A folder that a command writes into over time (a training run): pre-flight, lock, debris removal.

    The folder must be absent, empty or hold only what flowturbo recorded (else refused, naming the unknown
    entries; ``check_owned=False`` skips this for a resumed run, which adds files and removes none of the
    user's), and must not be another kind of flowturbo output or another command's run (:func:`check_kind`).
    It is created (normal permissions) with an ownership record; writers add their files with
    ``record=folder``. Temporary files of dead writers inside it are removed.
    """
    check_writable_target(folder)
    folder = resolve_target(folder)
    check_kind(folder, command=command)  # a resumed run too: only the train command of that run writes into it
    created = make_folders(folder.parent)
    try:
        with lock_target(folder, wait=wait):
            remove_stale_debris(folder)
            remove_stale_temp_files(folder)  # before judging ownership: a killed run's half-written files
            check_kind(folder, command=command)  # again, under the lock
            if check_owned:
                check_replaceable(folder, what)
            created += make_folders(folder)
            if read_ownership(folder) is None:
                write_ownership(folder, [], command)
            yield folder
    except BaseException:
        for path in reversed(created):
            if path == folder and all(Path(f).name == OWNERSHIP_FILE for f in list_files(path)):
                shutil.rmtree(path, ignore_errors=True)  # this run's folder, holding nothing but its records
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


__all__ = [
    "OWNERSHIP_FILE",
    "OutputFolder",
    "SEAL_KEY",
    "SealError",
    "OwnershipRecord",
    "COMMAND_KINDS",
    "KINDS",
    "KIND_BUNDLE",
    "KIND_EVAL",
    "KIND_EXPORT",
    "KIND_SAMPLE",
    "KIND_TRAINING_RUN",
    "KIND_TUNE",
    "add_owned",
    "artifact_key",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_apart",
    "check_kind",
    "check_replaceable",
    "check_writable_target",
    "canonical_json",
    "describe_kind",
    "file_mode",
    "folder_kind",
    "folder_mode",
    "json_text",
    "kind_of_command",
    "list_files",
    "lock_path_for",
    "lock_target",
    "make_folders",
    "new_staging_folder",
    "owned_run_folder",
    "prepare_output_folder",
    "read_ownership",
    "read_sealed_json",
    "remove_owned",
    "remove_stale_debris",
    "remove_stale_staging",
    "remove_stale_temp_files",
    "resolve_target",
    "sha256_bytes",
    "sealed_json_bytes",
    "sha256_file",
    "swap_into_place",
    "unknown_entries",
    "write_ownership",
]
