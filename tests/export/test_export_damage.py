"""Issue 19's bite check: damage each file a manifest lists, in turn, for every variant (and with the encoder).

A hand mutation that skipped the SHA-256 check of the predictor graphs in ``runtime/artifacts.py`` (``verify_files``)
survived every test, because the damage tests corrupted only ``refiner_step.onnx``. Here every listed file of every
variant gets one flipped byte in its middle (same size, so only the checksum can catch it) and, separately, is
truncated and removed; loading must refuse each, naming that file, with a rebuild command that runs as printed
(the command is executed once per variant: it rebuilds the directory in place).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from flowturbo.errors import CheckpointError
from flowturbo.export.manifest import MANIFEST_FILE
from flowturbo.fileio import read_sealed_json
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.cli import main
from micro_models import save_tiny_bundle

pytestmark = pytest.mark.slow  # three exports of a micro bundle: ~40 s on the 2-core CPU

VARIANTS = {
    "time-input": [],
    "per-step": ["--variant", "per-step"],
    "unrolled": ["--variant", "unrolled"],
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("damage") / "micro", seed=3)


@pytest.fixture(scope="module")
def exports(bundle_dir, tmp_path_factory) -> dict[str, Path]:
    """One ONNX export per variant of the micro bundle (H1R1: every graph role), through the command line."""
    root = tmp_path_factory.mktemp("damage_exports")
    made = {}
    for name, flags in VARIANTS.items():
        made[name] = root / name
        assert main(["export", "--model", str(bundle_dir), "--schedule", "H1R1", "--cfg", "1.5", "--batch", "1:2:3",
                     "--no-validate", *flags, "--out", str(made[name])]) == 0
    return made


def _listed(export: Path) -> list[str]:
    return sorted(read_sealed_json(export / MANIFEST_FILE, fix="")["files"])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_listed_file_is_checked_for_every_variant(exports, tmp_path, variant):
    files = _listed(exports[variant])
    roles = {"time-input": {"predictor", "refiner", "decoder"}, "per-step": {"predictor", "refiner", "decoder"},
             "unrolled": {"unrolled"}}[variant]
    manifest = read_sealed_json(exports[variant] / MANIFEST_FILE, fix="")
    assert {a["role"] for a in manifest["artifacts"]} == roles and len(files) >= len(roles)
    for rel in files:
        for damage, needle in (("corrupt", "does not match its SHA-256"), ("truncate", "bytes but the manifest"),
                               ("delete", "is missing")):
            copy = Path(shutil.copytree(exports[variant], tmp_path / f"{Path(rel).stem}-{damage}"))
            target = copy / rel
            if damage == "corrupt":
                _flip_middle_byte(target)
            elif damage == "truncate":
                target.write_bytes(target.read_bytes()[:-1])
            else:
                target.unlink()
            with pytest.raises(CheckpointError, match=needle) as caught:
                load_artifacts(copy)
            assert str(target) in str(caught.value) and "--overwrite" in str(caught.value), (rel, damage)
            shutil.rmtree(copy)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_rebuild_command_of_a_damaged_export_runs_as_printed(exports, tmp_path, variant, capsys):
    """The hint is built from the manifest (model, schedule, cfg, formats, batch profile, opset, precision,
    variant) with ``--out THE_DIRECTORY --overwrite``: following it (once, for the cheapest variant) gives a
    directory that loads again; for every variant it parses as a ``flowturbo export`` command line."""
    from flowturbo.runtime.cli import build_parser

    copy = Path(shutil.copytree(exports[variant], tmp_path / "art"))
    _flip_middle_byte(copy / _listed(copy)[0])
    with pytest.raises(CheckpointError) as caught:
        load_artifacts(copy)
    command = shlex.split(str(caught.value).split("`")[1])
    assert command[:2] == ["flowturbo", "export"] and command[-3:] == ["--out", str(copy), "--overwrite"]
    args = build_parser("export").parse_args(command[1:])
    assert (args.variant, args.batch, args.schedule, args.cfg) == (variant, "1:2:3", "H1R1", 1.5)
    if variant == "time-input":
        assert main([*command[1:], "--no-validate"]) == 0, capsys.readouterr().err
        load_artifacts(copy)
