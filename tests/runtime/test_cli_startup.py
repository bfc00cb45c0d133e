"""`flowturbo schedule` and `flowturbo --help` stay light: the train/export/profile groups (torch, models,
Triton) are registered for real only when invoked."""

from __future__ import annotations

import subprocess
import sys

from flowturbo.runtime.cli import _SUBCOMMAND_MODULES, build_parser, main

PROBE = """
import sys
from flowturbo.runtime.cli import main
main({argv!r})
heavy = ("torch", "triton", "flowturbo.training.models", "flowturbo.training.train_cli", "flowturbo.export.export_cli")
print("HEAVY:" + ",".join(m for m in heavy if m in sys.modules))
"""


def _heavy_modules_after(argv: list[str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    return next(line for line in done.stdout.splitlines() if line.startswith("HEAVY:"))


def test_schedule_command_imports_no_torch():
    assert _heavy_modules_after(["schedule", "H1P5R3"]) == "HEAVY:"


def test_every_group_is_listed_and_the_invoked_one_is_real(capsys):
    names = [name for name, *_ in _SUBCOMMAND_MODULES]
    choices = build_parser("").__dict__["_subparsers"]._group_actions[0].choices
    assert set(names) <= set(choices)
    assert main(["export", "--out", "x", "--format", "nonsense"]) == 2  # the real export parser ran its handler
    assert "unknown export format" in capsys.readouterr().err
