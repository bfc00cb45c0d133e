"""What every flowturbo command line shares (torch-free): argument types, path roles, one-line errors, torchrun.

* **Numbers are checked at parse time** (:class:`Number`): ``--cfg nan``, ``--budget-ms inf``, ``--batch -1`` end
  in one ``error:`` line before anything is imported or loaded. The types name the allowed range.
* **Path roles** (:func:`input_path`, :func:`output_path`): a flag declared with one of these types carries its
  role and its name with its value, so :func:`check_path_arguments` applies the input rule
  (:func:`flowturbo.fileio.check_apart`) to every command at once, before its handler runs: an output that is,
  contains or lies inside an input (or another output) is refused, naming both. ``--config`` files are read in
  full before anything is written and are not inputs in this sense (``train ... --config RUN/config.json --out
  RUN --resume`` continues a run with its own settings).
* **One error line** (:class:`ArgumentParser`): argparse's own mistakes (unknown choice, missing flag, bad
  number) print ``flowturbo COMMAND: error: ...`` on one line, as every other refusal does, and exit with 2.
* **torchrun** (:func:`other_rank_exits`): commands that do not split their work over processes run on rank 0
  only; the other ranks exit at once, touching nothing. :func:`stop_cleanly_on_sigterm` turns SIGTERM (a user's
  ``kill``, torchrun stopping a group) into an exception, so every ``with`` block unwinds: no staging folder and
  no lock file are left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from flowturbo.errors import FlowTurboError

SEED_LIMIT = 2**63  # seeds are in [0, 2^63): torch generators take signed 64-bit seeds
DISTRIBUTED_COMMANDS = ("sample", "eval", "tune", "train autoencoder", "train predictor", "train refiner")


# ------------------------------------------------------------------------------------------------ parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse with flowturbo's error format: one ``PROG: error: ...`` line (``argument --x: ...`` shortened to
    ``--x ...``) pointing at ``--help``, exit status 2. Sub-parsers inherit the class."""

    def error(self, message: str) -> Any:  # noqa: D102 (argparse's hook)
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message).replace("\n", " ")
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


# ----------------------------------------------------------------------------------------------- numbers
class Number:
    """An argparse ``type`` for a finite number in a range: ``Number(int, low=1)``, ``Number(float, low=0,
    low_open=True, high=1)``. NaN and infinities are refused unless ``finite=False`` (then only NaN)."""

    def __init__(self, kind: type = float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True, what: str = "") -> None:
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open, self.finite = low_open, high_open, finite
        self.what = what

    def describe(self) -> str:
        """``an integer in [1, 4096]``, ``a finite number > 0``, ..."""
        noun = "an integer" if self.kind is int else ("a finite number" if self.finite else "a number")
        if self.what:
            return f"{noun} {self.what}"
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return noun

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text.strip())
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        bad = isinstance(value, float) and (math.isnan(value) or (self.finite and math.isinf(value)))
        if self.low is not None:
            bad = bad or value < self.low or (self.low_open and value == self.low)
        if self.high is not None:
            bad = bad or value > self.high or (self.high_open and value == self.high)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


FINITE = Number(float)
NON_NEGATIVE = Number(float, low=0)
POSITIVE = Number(float, low=0, low_open=True)
UNIT_INTERVAL = Number(float, low=0, high=1)
POSITIVE_INT = Number(int, low=1)
NON_NEGATIVE_INT = Number(int, low=0)
SEED = Number(int, low=0, high=SEED_LIMIT - 1, what=f"in [0, 2^63) = [0, {SEED_LIMIT - 1}]")
GUIDANCE_SCALE = Number(float, low=0, what=">= 0 (1: no guidance)")


def int_in(low: int, high: int) -> Number:
    """An integer in ``[low, high]``."""
    return Number(int, low=low, high=high)


# ------------------------------------------------------------------------------------------------- paths
INPUT, OUTPUT = "input", "output"


class PathArgument(str):
    """A path from the command line that knows its flag and role (an input the command reads, or an output it
    writes); it is a ``str`` everywhere else. :func:`check_path_arguments` turns it back into a plain ``str``."""

    flag: str
    role: str

    def __new__(cls, value: str, flag: str, role: str) -> "PathArgument":
        made = super().__new__(cls, value)
        made.flag, made.role = flag, role
        return made


class _PathType:
    def __init__(self, flag: str, role: str, keywords: tuple[str, ...] = (), suffix: str | None = None) -> None:
        self.flag, self.role, self.keywords, self.suffix = flag, role, keywords, suffix

    def __call__(self, text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError("must be a path, got ''")
        if text in self.keywords or (self.suffix is not None and not text.lower().endswith(self.suffix)):
            return text  # a name (``fashion-mnist``, ``H1P5R3``), not a path
        return PathArgument(text, self.flag, self.role)

    def __repr__(self) -> str:
        return f"{self.role} path"


def input_path(flag: str, *, keywords: tuple[str, ...] = (), suffix: str | None = None) -> _PathType:
    """argparse ``type`` of a path the command reads (``--model``, ``--image``, ...). ``keywords``: values that
    are names, not paths (``--dataset fashion-mnist``); ``suffix``: only values ending in it are paths
    (``--schedule FILE.json``; ``--schedule H1P5R3`` is notation)."""
    return _PathType(flag, INPUT, keywords, suffix)


def output_path(flag: str) -> _PathType:
    """argparse ``type`` of a path the command writes (``--out``, ``tune --export`` / ``--cache``)."""
    return _PathType(flag, OUTPUT)


def path_arguments(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(outputs, inputs) of a parsed command line: ``(flag, path)`` of every :class:`PathArgument` in ``args``."""
    found: dict[str, list[tuple[str, str]]] = {INPUT: [], OUTPUT: []}
    for value in vars(args).values():
        if isinstance(value, PathArgument):
            found[value.role].append((value.flag, str(value)))
    return found[OUTPUT], found[INPUT]


def check_path_arguments(args: argparse.Namespace,
                         extra_outputs: Iterable[tuple[str, str | None]] = ()) -> None:
    """The input rule for a parsed command line (:func:`flowturbo.fileio.check_apart`), before any work; then
    every :class:`PathArgument` in ``args`` becomes a plain ``str`` again (configs and checkpoints store plain
    strings). ``extra_outputs``: outputs that no flag names (a default cache folder)."""
    from flowturbo.fileio import check_apart

    outputs, inputs = path_arguments(args)
    check_apart([*outputs, *extra_outputs], inputs)
    for name, value in vars(args).items():
        if isinstance(value, PathArgument):
            setattr(args, name, str(value))


# ---------------------------------------------------------------------------------------------- torchrun
def rank_from_env() -> int:
    """This process's ``RANK`` as torchrun sets it (0 without torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise FlowTurboError(f"RANK={os.environ.get('RANK')!r} is not an integer") from None


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise FlowTurboError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def other_rank_exits(command: str) -> bool:
    """Under torchrun, whether this process should exit at once because ``command`` (e.g. ``export``,
    ``train package``) does not split its work over processes: True on every rank but 0, which runs it alone
    (and says so on stderr). Always False without torchrun and for the commands in
    :data:`DISTRIBUTED_COMMANDS`."""
    world = world_size_from_env()
    if world == 1 or command in DISTRIBUTED_COMMANDS:
        return False
    if rank_from_env() != 0:
        return True
    print(f"flowturbo {command}: note: {command} does not split its work over processes; under torchrun rank 0 runs "
          f"it alone and the other {world - 1} process(es) exit at once", file=sys.stderr)
    return False


class Terminated(FlowTurboError):
    """SIGTERM arrived: the command stops, removing what it staged; the previous output is unchanged."""


SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM  # 143, as a shell reports a process stopped by SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean unwinding; a second SIGTERM must not cut it short
    raise Terminated("stopped by SIGTERM before finishing: what it had staged is removed and its outputs keep their "
                     "previous content")


@contextlib.contextmanager
def stop_cleanly_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (so ``with`` blocks remove staging
    folders and lock files); the previous handler is restored afterwards. Nothing changes outside the main
    thread."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str], command_of: Callable[[argparse.Namespace], str],
                before: Callable[[], None] | None = None) -> int:
    """Parse ``argv`` and run the chosen handler (``args.handler``) the way every flowturbo command line does:
    a bad flag is one ``error:`` line; under torchrun a command that does not split its work runs on rank 0
    only (:func:`other_rank_exits`); the input rule is applied to the paths (:func:`check_path_arguments`);
    a :class:`FlowTurboError` is one ``flowturbo COMMAND: error: ...`` line and status 2 (SIGTERM: status 143),
    Ctrl-C status 130. ``command_of(args)`` names the command (``export``, ``train package``); ``before`` runs
    after parsing (e.g. to set the warning format)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (its one error line is printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if before is not None:
        before()
    command = command_of(args)
    try:
        if other_rank_exits(command):
            return 0
        with stop_cleanly_on_sigterm():
            check_path_arguments(args)
            return int(args.handler(args) or 0)
    except Terminated as exc:
        print(f"flowturbo {command}: error: {exc}", file=sys.stderr)
        return SIGTERM_EXIT_STATUS
    except FlowTurboError as exc:
        print(f"flowturbo {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = [
    "ArgumentParser",
    "DISTRIBUTED_COMMANDS",
    "FINITE",
    "GUIDANCE_SCALE",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "Number",
    "POSITIVE",
    "POSITIVE_INT",
    "PathArgument",
    "SEED",
    "SEED_LIMIT",
    "SIGTERM_EXIT_STATUS",
    "Terminated",
    "UNIT_INTERVAL",
    "check_path_arguments",
    "input_path",
    "int_in",
    "other_rank_exits",
    "output_path",
    "path_arguments",
    "rank_from_env",
    "run_command",
    "stop_cleanly_on_sigterm",
    "world_size_from_env",
]
