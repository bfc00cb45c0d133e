"""Print what CMake needs to build the C++ runner against the installed torch (``KEY=VALUE`` lines).

Called by CMakeLists.txt with the Python it builds for. Lists are comma-separated. Keys:

* ``VERSION``       torch's version (``2.13.0+cpu``)
* ``INCLUDE_DIRS``  torch's C++ include folders (as ``torch.utils.cpp_extension.include_paths()``)
* ``LIBRARY_DIR``   the folder of libc10 / libtorch / libtorch_cpu (and libtorch_cuda on CUDA builds)
* ``CXX11_ABI``     the ``_GLIBCXX_USE_CXX11_ABI`` value torch was built with (0 or 1)
* ``CUDA_VERSION``  empty for a CPU build of torch, else the CUDA version it was built for (``13.0``)
* ``CUDA_CANDIDATES`` existing folders that may hold the CUDA runtime headers and ``libcudart``, in the order
  they are searched: ``$CUDA_HOME``, ``$CUDA_PATH``, the toolkit of the ``nvcc`` on PATH (symlinks resolved),
  ``/usr/local/cuda``, then the ``nvidia`` pip packages beside torch (``nvidia/cu13``, ``nvidia/cuda_runtime``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cuda_candidates(site_packages: Path) -> list[str]:
    """Existing folders to search for ``cuda_runtime_api.h`` / ``libcudart`` (see the module docstring)."""
    roots: list[Path] = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            roots.append(Path(os.environ[variable]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(Path(nvcc).resolve().parent.parent)
    roots.append(Path("/usr/local/cuda"))
    nvidia = site_packages / "nvidia"
    if nvidia.is_dir():
        roots += sorted(p for p in nvidia.glob("cu[0-9]*") if p.is_dir())
        roots += [nvidia / "cuda_runtime", nvidia / "cuda_nvcc"]
    seen: list[str] = []
    for root in roots:
        text = str(root.resolve()) if root.exists() else ""
        if text and text not in seen:
            seen.append(text)
    return seen


def main() -> None:
    import torch
    import torch.utils.cpp_extension as cpp_extension

    torch_dir = Path(torch.__file__).resolve().parent
    info = {
        "VERSION": torch.__version__,
        "INCLUDE_DIRS": ",".join(cpp_extension.include_paths()),
        "LIBRARY_DIR": str(torch_dir / "lib"),
        "CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "CUDA_VERSION": torch.version.cuda or "",
        "CUDA_CANDIDATES": ",".join(cuda_candidates(torch_dir.parent)) if torch.version.cuda else "",
    }
    for key, value in info.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
