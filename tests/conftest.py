"""Shared test set-up.

Triton's interpreter must be chosen before any kernel module is imported: on a machine without CUDA we
set TRITON_INTERPRET=1 here, at conftest import time, which is before test modules import flowturbo.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # torch missing: the suite will fail loudly at the first import anyway
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from tolerances import tol`

import pytest  # noqa: E402
import torch  # noqa: E402

import flowturbo  # noqa: E402,F401 - first: run from the repository, kernels/ must not shadow the installed `kernels`

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")


def disable_tf32() -> None:
    """float32 means IEEE float32 in the tests: TF32 matmuls / convolutions (cuDNN's default for convolutions) are
    ~1e-3 accurate, over the fp32 tolerances of tests/tolerances.py. Set once, for the whole session, on CUDA."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


if torch.cuda.is_available():
    disable_tf32()


@pytest.fixture
def seeded() -> torch.Generator:
    """A fixed-seed CPU generator (tests draw random non-zero inputs from it)."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny random diffusers pipeline folders (SD3, FLUX.1-dev / -schnell, an SD 1.5 to refuse), built offline once
    per session with ``save_pretrained`` (tests/tiny_diffusers.py); name -> folder."""
    from tiny_diffusers import save_tiny_pipelines

    torch.manual_seed(0)
    return save_tiny_pipelines(tmp_path_factory.mktemp("tiny_pipelines"))


@pytest.fixture(scope="session")
def sd3_refiner(tiny_pipelines, tmp_path_factory) -> Path:
    """A token refiner for the tiny SD3 at CFG ``tiny_diffusers.REFINER_CFG``, every weight random non-zero
    (:func:`tiny_diffusers.write_random_token_refiner`)."""
    from tiny_diffusers import REFINER_CFG, write_random_token_refiner

    torch.set_num_threads(1)
    return write_random_token_refiner(tiny_pipelines["sd3"],
                                      tmp_path_factory.mktemp("token_refiner") / "refiner.safetensors", REFINER_CFG)
