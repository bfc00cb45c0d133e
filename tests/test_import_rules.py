"""The one-way import rule (DESIGN.md §3): kernels -> training -> export -> runtime.

A module may import from its own layer, the layers to its left, and the pure-data root modules
(``flowturbo``, ``flowturbo.schedule``, ``flowturbo.errors``, ``flowturbo.fileio``, ``flowturbo.integrator``,
``flowturbo.refiner_dt``, ``flowturbo.cliargs``, ``flowturbo.imageio``, ...) — never
from a layer to its right.
``runtime/`` loads artifacts without importing training/export code, except through the documented entry
points listed in RUNTIME_TRAINING_ENTRY_POINTS (the pure-PyTorch backend and the CLI that registers the
``train``/``export`` commands).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "training", "export", "runtime"]
ROOT_MODULES = {"flowturbo", "flowturbo.schedule", "flowturbo.errors", "flowturbo.fileio", "flowturbo.integrator",
                "flowturbo.dtypes", "flowturbo.noise", "flowturbo.refiner_dt", "flowturbo._C", "flowturbo.cliargs",
                "flowturbo.imageio", "flowturbo.families", "flowturbo._source_tree"}
# Root files that are entry points, not data: each may import exactly the modules listed (inside a function),
# nothing else from any layer. `python -m flowturbo` must reach the CLI of the runtime layer.
ROOT_ENTRY_POINTS = {"flowturbo/__main__.py": {"flowturbo.runtime.cli"}}
# The libtorch-linked C++ runner is part of the runtime layer (compiled from runtime/csrc).
RUNTIME_EXTENSIONS = {"flowturbo._runner"}
RUNTIME_TRAINING_ENTRY_POINTS = {"runtime/cli.py", "runtime/pytorch_backend.py",
                                 # the tuner: samples with the reference samplers, scores with training's metrics,
                                 # and (--export) writes artifacts through export's pipeline
                                 "runtime/tune.py", "runtime/tune_cli.py",
                                 # eval under torchrun scores gathered features with training's metrics
                                 "runtime/sharded_cli.py"}


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "flowturbo" or name.startswith("flowturbo.")]


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _source_files():
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            rel = path.relative_to(REPO / layer).with_suffix("")
            package = ".".join(["flowturbo", layer, *rel.parts[:-1]])
            yield layer, path, package
    for path in sorted((REPO / "flowturbo").glob("*.py")):
        yield None, path, "flowturbo"


def test_layers_import_only_to_their_left():
    violations = []
    for layer, path, package in _source_files():
        rel = path.relative_to(REPO).as_posix()
        for line, module in _imports(path, package):
            target = _layer_of(module)
            if layer is None:  # root modules are pure data: they import no layer at all
                if target is not None and module not in ROOT_ENTRY_POINTS.get(rel, set()):
                    violations.append(f"{rel}:{line} root module imports {module}")
                continue
            if target is None:
                if module in RUNTIME_EXTENSIONS and layer != "runtime":
                    violations.append(f"{rel}:{line} ({layer}) imports the runtime extension {module}")
                elif module not in ROOT_MODULES | RUNTIME_EXTENSIONS:
                    violations.append(f"{rel}:{line} imports unknown flowturbo module {module}")
                continue
            if LAYERS.index(target) > LAYERS.index(layer):
                violations.append(f"{rel}:{line} ({layer}) imports {module} ({target}, to its right)")
            if layer == "runtime" and target in ("training", "export") and rel not in RUNTIME_TRAINING_ENTRY_POINTS:
                violations.append(f"{rel}:{line} runtime imports {module}; only {sorted(RUNTIME_TRAINING_ENTRY_POINTS)} may")
    assert not violations, "import rule broken:\n" + "\n".join(violations)


def test_root_entry_point_imports_only_the_cli_lazily():
    """flowturbo/__main__.py reaches the CLI, inside a function (importing flowturbo stays layer-free)."""
    path = REPO / "flowturbo" / "__main__.py"
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(not (getattr(n, "module", "") or "").startswith("flowturbo") for n in top_level)
    assert {m for _, m in _imports(path, "flowturbo")} == ROOT_ENTRY_POINTS["flowturbo/__main__.py"]


def test_rule_checker_sees_violations(tmp_path):
    """The checker itself must catch a rightward import (guards against a checker that finds nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from flowturbo.runtime import cli\nfrom ..export import manifest\n")
    modules = [m for _, m in _imports(bad, "flowturbo.kernels")]
    assert modules == ["flowturbo.runtime", "flowturbo.export"]
    assert [_layer_of(m) for m in modules] == ["runtime", "export"]
