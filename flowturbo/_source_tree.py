"""Keep the source tree's layer folders from shadowing installed top-level packages of the same name.

flowturbo's layers are top-level folders of the repository (``kernels/``, ``training/``, ``export/``, ``runtime/``)
installed as ``flowturbo.kernels``, ``flowturbo.training``, ... . An editable install, and ``python -m ...`` run from
the repository root, put the repository root on ``sys.path``, where the folder ``kernels/`` would answer a plain
``import kernels``: the name of the PyPI package ``kernels``, which ``transformers`` >= 5.25 depends on and imports
(``transformers.integrations.hub_kernels``; diffusers reaches it when it loads a pipeline or a VAE). The finder below
sends those top-level names to an installed distribution of that name when there is one, and changes nothing
otherwise (nothing installed under the name, or flowturbo installed as a wheel: no layer folder on ``sys.path``).
flowturbo itself never imports its layers by their bare folder names.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from typing import Any

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, in a source tree
LAYER_FOLDERS = ("kernels", "training", "export", "runtime")


def _is_source_tree(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "pyproject.toml")) and all(
        os.path.isdir(os.path.join(root, name)) for name in LAYER_FOLDERS)


class InstalledBeforeLayerFolders(importlib.abc.MetaPathFinder):
    """``import kernels`` (or another layer folder's name) finds an installed package of that name first."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> Any:
        if path is not None or fullname not in LAYER_FOLDERS:  # only these top-level names
            return None
        elsewhere = [entry for entry in sys.path
                     if isinstance(entry, str) and os.path.abspath(entry or os.curdir) != self.root]
        return importlib.machinery.PathFinder.find_spec(fullname, elsewhere)  # None: the usual search goes on


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), when flowturbo runs from its source tree."""
    if _is_source_tree(SOURCE_ROOT) and not any(isinstance(f, InstalledBeforeLayerFolders) for f in sys.meta_path):
        sys.meta_path.insert(0, InstalledBeforeLayerFolders(SOURCE_ROOT))
