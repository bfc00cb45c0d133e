"""``python -m flowturbo ...`` (and ``torchrun ... -m flowturbo sample | eval | tune ...``): the ``flowturbo`` command.

An entry point, not a root module of the data contract: it only hands over to the command line of the runtime
layer, imported when run (so ``import flowturbo`` stays torch-free and layer-free). ``tests/test_import_rules.py``
allows this one file exactly this one import.
"""

from __future__ import annotations

import sys


def main() -> int:
    from flowturbo.runtime.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
