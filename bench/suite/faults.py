"""Fault injection for rehearsing the GPU suite on a CPU (``--inject-fault NAME``, repeatable).

Each name makes one part of the suite fail the way it could on a lent GPU, so the rehearsal
(``scripts/rehearse_device.sh``) and the CI tests can prove that the JSON record and the table still come out
and that one failure skips only what depends on it. Torch-free.
"""

from __future__ import annotations

FAULTS: dict[str, str] = {
    "build": "the editable install fails (the suite goes on with the pure-Python layers)",
    "preflight:diffusers": "`from diffusers import AutoencoderKL` fails (rows use our autoencoder instead)",
    "preflight:triton": "the Triton probe launch fails (row d is skipped, the export uses the reference kernels)",
    "preflight:graph": "the pre-flight CUDA-graph capture fails (rows c, d are skipped)",
    "preflight:aoti": "the pre-flight AOTInductor compile fails (export, rows e, f are skipped)",
    "models": "building the models fails (every row is skipped, the record is still written)",
    "f64": "the float64 reference path fails (rows run without the f64 column)",
    "capture": "every CUDA-graph capture of rows c/d falls back to step by step (an error per row)",
    "export-check": "the export's check against eager fails (recorded in the manifest; rows e, f still run)",
    "export": "the AOTInductor export raises (rows e, f are skipped)",
    "tests-timeout": "the pytest run outlives its timeout (recorded as a timeout)",
    "kernel-bench-timeout": "the kernel bench outlives its timeout (recorded as a timeout)",
    "text-row": "row t raises after its imports (an error; the record and the rest of the phase go on)",
    "text-row:import": "row t cannot import diffusers' SD3Transformer2DModel (skipped, naming the wheel to carry)",
}
PREFIXED = {
    "row:": "row:<key>@<batch> raises inside that row's timing (e.g. row:b@2)",
    "user:": "user:<command> makes that user command fail (e.g. user:sample)",
}


class InjectedFault(RuntimeError):
    """Raised where an injected fault fires."""


class Faults:
    """The faults asked for on the command line."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names = set(names or [])
        unknown = [n for n in self.names if n not in FAULTS and not n.startswith(tuple(PREFIXED))]
        if unknown:
            known = ", ".join([*FAULTS, *(f"{k}..." for k in PREFIXED)])
            raise SystemExit(f"gpu_suite: error: unknown --inject-fault {unknown}; known: {known}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def fire(self, name: str) -> None:
        """Raise :class:`InjectedFault` if ``name`` was asked for."""
        if name in self.names:
            raise InjectedFault(f"injected fault {name!r}: {FAULTS.get(name, 'requested on the command line')}")


def describe() -> str:
    """The list for ``--help``."""
    return "\n".join(f"  {name:<22} {text}" for name, text in [*FAULTS.items(), *PREFIXED.items()])


__all__ = ["FAULTS", "Faults", "InjectedFault", "describe"]
