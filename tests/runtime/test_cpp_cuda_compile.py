"""The C++ runner's CUDA-only code (graph capture, timing events, streams) compiles on this CPU machine.

CI builds the runner against a CPU torch, so ``#ifdef FLOWTURBO_WITH_CUDA`` code is otherwise only compiled on
a lent GPU — where a compile error costs the whole lend (issue 18). This syntax-checks it with
``FLOWTURBO_WITH_CUDA`` against the installed torch's headers (the CPU wheel ships c10/cuda and ATen/cuda; only
the generated ``c10/cuda/impl/cuda_cmake_macros.h`` of CUDA builds is missing and stood in for here) and the
CUDA runtime header, and pins that the runner needs nothing of CUDA but the runtime header (no cuBLAS /
cuSPARSE / cuSOLVER headers: the device's toolkit may lack them). ``scripts/rehearse_device.sh`` does the full
build and link against torch 2.11's CUDA build.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("runtime/csrc/runner.cpp", "runtime/csrc/aoti_engine.cpp")


def _cuda_runtime_include() -> Path | None:
    spec = importlib.util.spec_from_file_location("_torch_build_info", REPO / "scripts" / "torch_build_info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for root in module.cuda_candidates(Path(torch.__file__).resolve().parent.parent):
        for sub in ("include", "targets/x86_64-linux/include"):
            if (Path(root) / sub / "cuda_runtime_api.h").is_file():
                return Path(root) / sub
    return None


CUDA_INCLUDE = _cuda_runtime_include()
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on this machine")
@pytest.mark.skipif(CUDA_INCLUDE is None, reason="no cuda_runtime_api.h here (set CUDA_HOME to a CUDA toolkit)")
@pytest.mark.parametrize("source", SOURCES)
def test_cuda_code_of_the_runner_compiles_with_only_the_cuda_runtime_headers(tmp_path, source):
    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")  # what CUDA builds of torch generate
    # Only the runtime's own folder: a cuBLAS / cuSPARSE / cuSOLVER header pulled in (ATen/cuda/CUDAContext.h)
    # fails here unless that toolkit happens to have them beside cuda_runtime_api.h.
    includes = [f"-I{REPO / 'runtime' / 'csrc'}", *(f"-isystem{p}" for p in cpp_extension.include_paths()),
                f"-isystem{CUDA_INCLUDE}", f"-isystem{tmp_path}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    proc = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-DFLOWTURBO_WITH_CUDA",
                           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(REPO / source)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_runner_sources_do_not_include_the_cuda_library_headers():
    """ATen/cuda/CUDAContext.h (directly or through ATen/cuda/CUDAEvent.h) needs the cuBLAS / cuSPARSE /
    cuSOLVER headers; the runner uses c10/cuda and ATen/cuda/CUDAGraph.h only (CMakeLists.txt)."""
    for source in SOURCES:
        includes = [line for line in (REPO / source).read_text().splitlines() if line.startswith("#include")]
        assert includes and not any("ATen/cuda/CUDAContext.h" in line or "ATen/cuda/CUDAEvent.h" in line
                                    for line in includes), (source, includes)
