"""Checkpoint I/O: read official SiT / FlowTurbo ``.pt`` files (and ``.safetensors``), infer their
architecture from the keys, and load them strictly with errors that name the offending keys.

Official layouts handled:

* ``SiT-XL-2-256x256.pt`` (``willisma/SiT``): a raw state dict.
* ``train.py`` checkpoints of SiT and FlowTurbo: ``{"model": ..., "ema": ..., "opt": ..., "args": Namespace}``
  (SiT's ``find_model`` takes ``"ema"``; FlowTurbo's released sampler takes ``"model"``). We follow the released
  code per file kind: predictors default to ``"ema"`` (:data:`PREDICTOR_DEFAULT_ENTRY`), refiners to ``"model"``
  (:data:`REFINER_DEFAULT_ENTRY`); ``prefer=`` / ``--checkpoint-entry`` overrides.
* Keys saved from a DDP or ``torch.compile`` wrapper carry ``module.`` / ``_orig_mod.`` prefixes: stripped.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import atomic_write_bytes
from flowturbo.kernels import KernelBackend
from flowturbo.training.models import (
    HEADS_BY_HIDDEN_SIZE,
    RefinerConfig,
    SiT,
    SiTConfig,
    VelocityRefiner,
    count_parameters,
    format_parameter_count,
)

STATE_DICT_CONTAINER_KEYS = ("ema", "model")  # where train.py checkpoints keep the weights
PREDICTOR_DEFAULT_ENTRY = "ema"  # SiT's find_model / sample.py take checkpoint["ema"]
REFINER_DEFAULT_ENTRY = "model"  # FlowTurbo's released sampler loads ckpt["model"] of a refiner checkpoint
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
SAFETENSORS_SUFFIX = ".safetensors"
MAX_KEYS_IN_ERROR = 5  # how many offending keys an error message lists per category
DEFAULT_CLASS_DROPOUT_PROB = 0.1  # assumed when the label table has a null row (official value)

# What torch.load raises on files that are not checkpoints (garbage gives KeyError, empty files EOFError).
_TORCH_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
DT_EMBEDDER_PREFIX = "dt_embedder."  # the keys of a dt-conditioned refiner's step-size embedding (ours only)

# Keys every SiT-layout state dict has (used to recognise one and to infer its shape).
_REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


# ------------------------------------------------------------------------------------------ reading
def load_checkpoint_file(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Read a ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file on CPU.

    ``argparse.Namespace`` (the ``"args"`` entry of official training checkpoints) is allow-listed for the
    safe loader. A file that still needs arbitrary unpickling is refused unless ``trust_pickle=True``
    (only for files you trust: unpickling can run code).
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint not found: {file} (expected a .pt/.pth/.bin or .safetensors file)")
    if not file.is_file():
        raise CheckpointError(f"checkpoint path {file} is a directory; expected a .pt/.pth/.bin or .safetensors file")
    if file.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise CheckpointError(
                f"{file} contains pickled objects the safe loader (weights_only=True) refuses ({exc}). "
                "If you trust this file, pass trust_pickle=True (--trust-pickle) to unpickle it fully."
            ) from exc
        safe_error: Exception = exc
    except _TORCH_LOAD_ERRORS as exc:
        raise CheckpointError(
            f"{file} is not a PyTorch checkpoint torch.load can read ({type(exc).__name__}: {exc}); "
            "expected a .pt file saved with torch.save or a .safetensors file"
        ) from exc
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, AttributeError, ImportError, *_TORCH_LOAD_ERRORS) as exc:
        raise CheckpointError(f"{file} could not be unpickled even with trust_pickle=True: {exc}") from safe_error


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def extract_state_dict(obj: Any, *, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint: a raw state dict, or its ``"ema"`` / ``"model"`` entry.

    ``prefer`` picks the entry when both exist (``"ema"``, the default, or ``"model"``). Leading
    ``module.`` / ``_orig_mod.`` prefixes are stripped. Raises :class:`CheckpointError` when no
    tensor state dict is found.
    """
    if prefer not in STATE_DICT_CONTAINER_KEYS:
        raise FlowTurboError(f"prefer must be one of {STATE_DICT_CONTAINER_KEYS}, got {prefer!r}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint holds a {type(obj).__name__}, not a state dict; expected a dict of tensors or a dict "
            "with a 'model' / 'ema' state dict"
        )
    order = (prefer,) + tuple(k for k in STATE_DICT_CONTAINER_KEYS if k != prefer)
    for key in order:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                f"(top-level keys: {sorted(map(str, obj))[:MAX_KEYS_IN_ERROR]} ...)"
            )
        new_key = _strip_wrapper_prefixes(key)
        if new_key in state:
            raise CheckpointError(f"checkpoint has key {new_key!r} twice (with and without a wrapper prefix)")
        state[new_key] = value
    if not state:
        raise CheckpointError("checkpoint holds an empty state dict")
    return state


def _resolve_state_dict(
    source: str | os.PathLike[str] | Mapping[str, Any], prefer: str, trust_pickle: bool
) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, (str, os.PathLike)):
        return extract_state_dict(load_checkpoint_file(source, trust_pickle=trust_pickle), prefer=prefer), str(source)
    return extract_state_dict(source, prefer=prefer), "the given state dict"


# ---------------------------------------------------------------------------------------- inference
def _infer_common(state_dict: Mapping[str, torch.Tensor], num_heads: int | None, what: str) -> dict[str, Any]:
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"the {what} keys fit no known architecture: missing {missing} "
            f"(first keys present: {list(state_dict)[:MAX_KEYS_IN_ERROR]}); expected a SiT/DiT-layout state dict"
        )
    proj = state_dict["x_embedder.proj.weight"]
    if proj.dim() != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"x_embedder.proj.weight has shape {tuple(proj.shape)}; expected (D, C, p, p)")
    hidden, embed_channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    pos = state_dict["pos_embed"]
    tokens = int(pos.shape[1]) if pos.dim() == 3 else -1
    grid = int(round(tokens**0.5)) if tokens > 0 else 0
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden or grid * grid != tokens:
        raise CheckpointError(f"pos_embed has shape {tuple(pos.shape)}; expected (1, T, {hidden}) with T a square")
    rows = int(state_dict["y_embedder.embedding_table.weight"].shape[0])
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)))
    mlp_hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    out_rows = int(state_dict["final_layer.linear.weight"].shape[0])
    if out_rows % (patch * patch):
        raise CheckpointError(
            f"final_layer.linear.weight has {out_rows} rows, not a multiple of patch^2 = {patch * patch}"
        )
    if num_heads is None:
        num_heads = HEADS_BY_HIDDEN_SIZE.get(hidden)
        if num_heads is None:
            raise CheckpointError(
                f"hidden size {hidden} matches no preset, so the head count is unknown; pass num_heads= "
                f"(known widths: {sorted(HEADS_BY_HIDDEN_SIZE)})"
            )
    return dict(
        hidden_size=hidden,
        embed_channels=embed_channels,
        patch_size=patch,
        input_size=grid * patch,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_hidden / hidden,
        num_classes=rows - 1,
        class_dropout_prob=DEFAULT_CLASS_DROPOUT_PROB,
        out_channels=out_rows // (patch * patch),
    )


def _learn_sigma(out_channels: int, in_channels: int, what: str) -> bool:
    if out_channels == 2 * in_channels:
        return True
    if out_channels == in_channels:
        return False
    raise CheckpointError(
        f"the {what}'s final layer has {out_channels} output channels per pixel; expected {in_channels} or "
        f"{2 * in_channels} (learn_sigma) for {in_channels} input channels"
    )


def infer_sit_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> SiTConfig:
    """The :class:`SiTConfig` an official-layout predictor state dict was built with.

    Hidden size, patch and channels come from ``x_embedder.proj``; input size from ``pos_embed``; depth from
    the block indices; classes from the label table (assumed to hold the null row); ``learn_sigma`` from the
    final layer; heads from the preset of that width unless ``num_heads`` is given.
    """
    info = _infer_common(state_dict, num_heads, "predictor")
    try:
        return SiTConfig(
            input_size=info["input_size"],
            patch_size=info["patch_size"],
            in_channels=info["embed_channels"],
            hidden_size=info["hidden_size"],
            depth=info["depth"],
            num_heads=info["num_heads"],
            mlp_ratio=info["mlp_ratio"],
            num_classes=info["num_classes"],
            class_dropout_prob=info["class_dropout_prob"],
            learn_sigma=_learn_sigma(info["out_channels"], info["embed_channels"], "predictor"),
        )
    except CheckpointError:
        raise
    except FlowTurboError as exc:
        raise CheckpointError(f"the predictor state dict describes an impossible SiT: {exc}") from exc


def has_dt_embedder(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a refiner state dict holds a step-size embedding (``dt_embedder.*``): a dt-conditioned refiner."""
    return any(key.startswith(DT_EMBEDDER_PREFIX) for key in state_dict)


def check_dt_conditioning(state_dict: Mapping[str, torch.Tensor], config: RefinerConfig, where: str) -> None:
    """Refuse weights whose dt conditioning differs from ``config``'s, naming the fix (before a strict load
    would list the ``dt_embedder.*`` keys without saying why)."""
    has_dt = has_dt_embedder(state_dict)
    if has_dt and not config.dt_conditioning:
        raise CheckpointError(
            f"the refiner in {where} is dt-conditioned (it has dt_embedder.* weights) but its config says "
            "dt_conditioning false; load it with a config that says \"dt_conditioning\": true (or without a config, "
            "which infers it from the keys), e.g. in the bundle's config.json \"refiner\" entry"
        )
    if not has_dt and config.dt_conditioning:
        raise CheckpointError(
            f"the refiner in {where} has no dt embedding (no dt_embedder.* weights: an official FlowTurbo refiner or "
            "one trained without --dt-conditioning) but its config says dt_conditioning true; load it with "
            "\"dt_conditioning\": false (or without a config, which infers it from the keys)"
        )


def infer_refiner_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> RefinerConfig:
    """The :class:`RefinerConfig` of an official-layout refiner state dict (patch embedding over 2C); dt
    conditioning when it holds ``dt_embedder.*`` keys."""
    info = _infer_common(state_dict, num_heads, "refiner")
    if info["embed_channels"] % 2:
        raise CheckpointError(
            f"refiner x_embedder.proj has {info['embed_channels']} input channels; a refiner embeds concat(x, v) "
            "so it must be even (is this a predictor checkpoint?)"
        )
    in_channels = info["embed_channels"] // 2
    try:
        return RefinerConfig(
            input_size=info["input_size"],
            patch_size=info["patch_size"],
            in_channels=in_channels,
            hidden_size=info["hidden_size"],
            num_heads=info["num_heads"],
            mlp_ratio=info["mlp_ratio"],
            num_classes=info["num_classes"],
            class_dropout_prob=info["class_dropout_prob"],
            depth=info["depth"],
            learn_sigma=_learn_sigma(info["out_channels"], in_channels, "refiner"),
            dt_conditioning=has_dt_embedder(state_dict),
        )
    except CheckpointError:
        raise
    except FlowTurboError as exc:
        raise CheckpointError(f"the refiner state dict describes an impossible refiner: {exc}") from exc


# ---------------------------------------------------------------------------------------- loading
def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_IN_ERROR])
    more = len(items) - MAX_KEYS_IN_ERROR
    return shown + (f", ... ({more} more)" if more > 0 else "")


def describe_module(module: nn.Module) -> str:
    """``"SiT-XL/2 (32x32x4 latents, 1000 classes) with 675.1M parameters"`` for our models."""
    config = getattr(module, "config", None)
    name = config.describe() if config is not None and hasattr(config, "describe") else type(module).__name__
    return f"{name} with {format_parameter_count(count_parameters(module))} parameters"


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: Mapping[str, str] | None = None, *, record: str | Path | None = None) -> None:
    """``safetensors.torch.save_file`` atomically (tensors made contiguous CPU copies); ``record`` as in
    :func:`flowturbo.fileio.atomic_write_bytes`. The one weights writer of bundles and training runs."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=dict(metadata) if metadata else None), record=record)


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str | None = None) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a :class:`CheckpointError` naming the
    first missing / unexpected keys and shape mismatches (both shapes) and the expected model."""
    what = what or describe_module(module)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(
            f"weights do not fit the expected {what}: " + "; ".join(problems)
            + ". Check that the checkpoint and the model config (preset, latent size, channels, classes) match."
        )
    module.load_state_dict(state_dict, strict=True)


def _materialize(
    factory: Any,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> nn.Module:
    """Build on the meta device (no random init, no double allocation), then allocate and load strictly."""
    with torch.device("meta"):
        module = factory()
    what = f"{describe_module(module)} (from {source})"
    module = module.to(dtype=dtype).to_empty(device=device)
    strict_load(module, state_dict, what)
    return module.eval()


def load_sit_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any],
    config: SiTConfig | None = None,
    *,
    num_heads: int | None = None,
    prefer: str = PREDICTOR_DEFAULT_ENTRY,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel_backend: KernelBackend | str = KernelBackend.REFERENCE,
    trust_pickle: bool = False,
) -> SiT:
    """A :class:`SiT` (eval mode) from a checkpoint path or a loaded checkpoint / state dict.

    ``config=None`` infers the architecture from the keys (:func:`infer_sit_config`).
    """
    state_dict, where = _resolve_state_dict(source, prefer, trust_pickle)
    config = config if config is not None else infer_sit_config(state_dict, num_heads)
    backend = KernelBackend.coerce(kernel_backend)
    return _materialize(lambda: SiT(config, kernel_backend=backend), state_dict, where, device, dtype)


def load_refiner_checkpoint(
    source: str | os.PathLike[str] | Mapping[str, Any],
    config: RefinerConfig | None = None,
    *,
    predictor_config: SiTConfig | None = None,
    num_heads: int | None = None,
    prefer: str = REFINER_DEFAULT_ENTRY,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel_backend: KernelBackend | str = KernelBackend.REFERENCE,
    trust_pickle: bool = False,
) -> VelocityRefiner:
    """A :class:`VelocityRefiner` (eval mode) from an official FlowTurbo refiner checkpoint or ours.

    ``config=None`` infers it (:func:`infer_refiner_config`), taking the head count from
    ``predictor_config`` when the widths agree. With ``predictor_config`` the refiner must fit that
    predictor (latent channels, latent size, classes), else :class:`CheckpointError`. A given ``config``
    must agree with the weights on dt conditioning (:func:`check_dt_conditioning`).
    """
    state_dict, where = _resolve_state_dict(source, prefer, trust_pickle)
    if config is None:
        proj = state_dict.get("x_embedder.proj.weight")
        if num_heads is None and predictor_config is not None and proj is not None:
            if proj.shape[0] == predictor_config.hidden_size:
                num_heads = predictor_config.num_heads
        config = infer_refiner_config(state_dict, num_heads)
    check_dt_conditioning(state_dict, config, where)
    if predictor_config is not None:
        for field in ("in_channels", "input_size", "num_classes"):
            if getattr(config, field) != getattr(predictor_config, field):
                raise CheckpointError(
                    f"the refiner in {where} has {field} = {getattr(config, field)} but the predictor "
                    f"{predictor_config.describe()} has {getattr(predictor_config, field)}; use the refiner "
                    "trained for this predictor"
                )
    backend = KernelBackend.coerce(kernel_backend)
    return _materialize(lambda: VelocityRefiner(config, kernel_backend=backend), state_dict, where, device, dtype)


__all__ = [
    "DT_EMBEDDER_PREFIX",
    "atomic_save_safetensors",
    "check_dt_conditioning",
    "describe_module",
    "extract_state_dict",
    "has_dt_embedder",
    "infer_refiner_config",
    "infer_sit_config",
    "load_checkpoint_file",
    "load_refiner_checkpoint",
    "load_sit_checkpoint",
    "strict_load",
]
