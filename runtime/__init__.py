"""flowturbo.runtime layer: ``from flowturbo.runtime import Sampler`` (loaded lazily, so that importing a
submodule such as ``flowturbo.runtime.artifacts`` does not pull in the models)."""

from typing import Any

__all__ = ["Sampler"]


def __getattr__(name: str) -> Any:
    if name == "Sampler":
        from flowturbo.runtime.sampler import Sampler

        return Sampler
    raise AttributeError(f"module 'flowturbo.runtime' has no attribute {name!r}")
