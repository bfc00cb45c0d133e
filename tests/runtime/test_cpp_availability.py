"""What the cpp backend says when the libtorch-linked runner is missing from the install."""

from __future__ import annotations

import sys

import pytest

from flowturbo.errors import FlowTurboError
from flowturbo.runtime import cpp_backend


def test_missing_runner_is_reported_with_the_build_status(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flowturbo._runner", None)  # import now raises ImportError
    reason = cpp_backend.cpp_unavailable_reason()
    from flowturbo._C import runner_build_status

    assert reason is not None and "flowturbo._runner" in reason and runner_build_status() in reason
    with pytest.raises(FlowTurboError, match="use --backend aoti or onnxruntime"):
        cpp_backend.CppSampler.from_artifacts(tmp_path)


def test_build_status_names_the_torch_it_was_built_against():
    import torch
    from flowturbo._C import runner_build_status

    status = runner_build_status()
    if cpp_backend.cpp_unavailable_reason() is None:
        assert status.startswith(f"built against torch {torch.__version__.split('+')[0]}")
        assert "TensorRT" in status
    else:
        assert status.startswith(("not built", "disabled"))
