"""The training loop every trainer shares, and its utilities.

:func:`run_training` owns everything that is not the loss: AdamW, an EMA copy of the weights, bf16 autocast on
CUDA (fp32 on CPU), gradient clipping, DDP (``torchrun``; NCCL on GPUs, gloo on CPU), a tqdm bar with loss
and samples/s, a loss-curve PNG, a ``max_minutes`` budget, NaN detection, and exact resume.

Exact resume: a checkpoint holds the model, the EMA, the optimizer, the step, the per-step loss history, the
data position (epoch + batches consumed; the data order is a pure function of the seed and the epoch) and
the RNG states of torch / CUDA / numpy / python of every rank. Resuming continues bit-for-bit: the loss curve
of "train N steps" equals that of "train k, save, resume, train N - k" (``tests/training/test_trainers_loop.py``).

Output folder layout (``out_dir``)::

    config.json                       resolved config of the run (the one a resume is checked against)
    loss_curve.png                    loss per step (+ moving average)
    checkpoints/step_00001000/        state.pt + config.json, written as a temp folder then renamed
    checkpoints/latest                name of the newest complete checkpoint folder

Every file is written atomically through :mod:`flowturbo.fileio` (temp file in the same folder + fsync +
``os.replace``) and listed in the run folder's ownership record (``.flowturbo-owned.json``); a new run refuses
a folder holding anything flowturbo did not write, and leftovers of a killed run are removed by the next one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flowturbo import fileio
from flowturbo.cliargs import SEED_LIMIT, rank_from_env
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import atomic_write_bytes, atomic_write_json  # re-exported: many trainer call sites

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LOSS_CURVE_FILE = "loss_curve.png"
STEP_DIR_FORMAT = "step_{:08d}"
CHECKPOINT_FORMAT_VERSION = 1
SECONDS_PER_MINUTE = 60.0
LOSS_CURVE_SMOOTHING = 50  # moving-average window of the loss-curve plot
LOSS_CURVE_DPI = 100
LOSS_CURVE_SIZE_INCHES = (7.0, 4.0)

PRECISIONS = ("auto", "fp32", "bf16")
# Config fields that decide the shapes of the trained weights: a resume may not change them, even with --force.
ARCHITECTURE_FIELDS = frozenset(
    {"model", "learn_sigma", "refiner_depth", "dt_conditioning", "model.latent_channels", "model.base_channels", "model.channel_mult",
     "model.num_res_blocks", "model.norm_groups", "model.image_channels"}
)
DEVICES = ("auto", "cpu", "cuda")

# LoopConfig fields that may change between a run and its resume without --force (wherever a LoopConfig
# sits in a trainer config: "loop.steps", "finetune.steps", ...).
RESUME_MUTABLE_LOOP_FIELDS = frozenset(
    {"steps", "max_minutes", "budget_ends_run", "progress", "log_every", "ckpt_every", "keep_checkpoints",
     "num_workers", "device"}
)


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping shared by all trainers. ``batch_size`` is global (split over ranks)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0  # linear lr warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # "auto": CUDA (cuda:LOCAL_RANK) when available, else CPU
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # newest checkpoint folders kept; 0 keeps all
    max_minutes: float | None = None  # stop cleanly (and save) after this much wall time
    # True: a max_minutes stop *finishes* the run (final weights are written, at the step reached) instead
    # of pausing it for --resume; used to train for a fixed wall-clock budget.
    budget_ends_run: bool = False
    progress: bool = True
    num_workers: int = 0  # DataLoader workers for file-backed datasets

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise FlowTurboError(f"loop.seed (--seed) must be an integer in [0, 2^63), got {self.seed!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlowTurboError(f"loop.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise FlowTurboError(f"loop.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise FlowTurboError(f"loop.lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FlowTurboError(f"loop.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip < 0:
            raise FlowTurboError(f"loop.grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise FlowTurboError(f"loop.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise FlowTurboError(f"loop.device must be one of {DEVICES}, got {self.device!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise FlowTurboError(f"loop.max_minutes must be positive (or None), got {self.max_minutes!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as JSON-ready plain data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loop": {"lr": 1}}`` -> ``{"loop.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences ``"loop.lr: 0.0001 -> 0.0002"`` between two config dicts."""
    a, b = flatten_config(old), flatten_config(new)
    missing = object()
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            fa = "(absent)" if va is missing else json.dumps(va)
            fb = "(absent)" if vb is missing else json.dumps(vb)
            changes.append(f"{key}: {fa} -> {fb}")
    return changes


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) frozen config dataclass from :func:`config_to_dict` output; unknown keys refused."""
    if not isinstance(data, Mapping):
        raise FlowTurboError(f"{cls.__name__} config must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FlowTurboError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------- atomic I/O
# Byte / JSON writes are flowturbo.fileio's (re-exported above); these two add the torch serialisers.
def atomic_torch_save(obj: Any, path: str | Path, *, record: str | Path | None = None) -> None:
    """``torch.save`` atomically (``record``: the folder whose ownership record lists the file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), record=record)


# ----------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Where this process runs: rank, world size, its device, and whether it set up the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`setup_distributed` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FlowTurboError("device 'cuda' requested but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank)
    if device == "auto":
        return torch.device("cpu")
    raise FlowTurboError(f"unknown device {device!r}; use one of {DEVICES}")


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns = True
    elif dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_process_group=owns)


def per_rank_batch(global_batch: int, ctx: DistContext) -> int:
    """The batch each rank computes; the global batch must split evenly."""
    if global_batch % ctx.world_size:
        raise FlowTurboError(
            f"batch size {global_batch} does not split over {ctx.world_size} processes; "
            f"use a multiple of {ctx.world_size}"
        )
    return global_batch // ctx.world_size


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``"auto"``/``"bf16"``; fp32 (no autocast) on CPU or for ``"fp32"``."""
    if precision == "fp32" or device.type != "cuda":
        if precision == "bf16" and device.type != "cuda":
            raise FlowTurboError("precision 'bf16' needs a CUDA device; use --precision fp32 or auto on CPU")
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def resolved_precision(precision: str, device: torch.device) -> str:
    return "bf16" if precision in ("auto", "bf16") and device.type == "cuda" else "fp32"


# -------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch CPU and (when present) CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- data
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a pure function of ``(seed, epoch)`` (no state to save)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)  # (num_items,)


class BatchSource:
    """An endless, exactly resumable stream of per-rank batches.

    Epochs are permutations of the items (:func:`epoch_permutation`); each global batch is cut into
    ``world_size`` contiguous slices, rank r taking slice r, so any number of ranks sees the same global
    batches. The incomplete tail of an epoch is dropped. State: ``{"epoch", "batch"}``.
    """

    def __init__(self, num_items: int, global_batch: int, ctx: DistContext, seed: int) -> None:
        if num_items < global_batch:
            raise FlowTurboError(
                f"the dataset has {num_items} items, fewer than one batch of {global_batch}; "
                "lower --batch-size or add data"
            )
        self.num_items = num_items
        self.global_batch = global_batch
        self.local_batch = per_rank_batch(global_batch, ctx)
        self.rank = ctx.rank
        self.seed = seed
        self.epoch = 0
        self.batch = 0  # global batches consumed in this epoch
        self.batches_per_epoch = num_items // global_batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def _local_indices(self, epoch: int, batch: int) -> torch.Tensor:
        perm = epoch_permutation(self.num_items, self.seed, epoch)
        start = batch * self.global_batch + self.rank * self.local_batch
        return perm[start : start + self.local_batch]  # (local_batch,)

    def _advance(self) -> tuple[int, int]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        here = (self.epoch, self.batch)
        self.batch += 1
        return here

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class TensorBatches(BatchSource):
    """Batches cut from in-memory tensors (e.g. pre-encoded latents and their labels), moved to ``device``."""

    def __init__(self, tensors: Sequence[torch.Tensor], global_batch: int, ctx: DistContext, seed: int,
                 device: torch.device | None = None) -> None:
        sizes = {int(t.shape[0]) for t in tensors}
        if len(sizes) != 1:
            raise FlowTurboError(f"data tensors disagree on the number of items: {sorted(sizes)}")
        super().__init__(sizes.pop(), global_batch, ctx, seed)
        self.tensors = tuple(tensors)
        self.device = device or ctx.device

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        epoch, batch = self._advance()
        idx = self._local_indices(epoch, batch)
        return tuple(t[idx].to(self.device, non_blocking=True) for t in self.tensors)


class _IndexList(torch.utils.data.Sampler):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DatasetBatches(BatchSource):
    """Batches loaded from a map-style Dataset (``(image, label)`` items) through a DataLoader.

    Items must be deterministic given ``(index, epoch)``: datasets with random augmentation expose
    ``set_epoch`` (as :class:`flowturbo.training.image_folder.ImageFolderDataset` does).
    """

    def __init__(self, dataset: Dataset, global_batch: int, ctx: DistContext, seed: int,
                 num_workers: int = 0) -> None:
        super().__init__(len(dataset), global_batch, ctx, seed)  # type: ignore[arg-type]
        self.dataset = dataset
        self.device = ctx.device
        self.num_workers = num_workers
        self._iterator: Iterator | None = None
        self._iterator_at: tuple[int, int] | None = None

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        super().load_state_dict(state)
        self._iterator = None

    def _open_epoch_at(self, epoch: int, batch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        perm = epoch_permutation(self.num_items, self.seed, epoch)
        indices: list[int] = []
        for b in range(batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.local_batch
            indices.extend(perm[start : start + self.local_batch].tolist())
        loader = DataLoader(
            self.dataset,
            batch_size=self.local_batch,
            sampler=_IndexList(indices),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )
        self._iterator = iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        epoch, batch = self._advance()
        if self._iterator is None or self._iterator_at != (epoch, batch):
            self._open_epoch_at(epoch, batch)
        images, labels = next(self._iterator)  # type: ignore[arg-type]
        self._iterator_at = (epoch, batch + 1)
        return images.to(self.device, non_blocking=True), torch.as_tensor(labels).to(self.device)


# -------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema <- decay * ema + (1 - decay) * model`` for every parameter."""
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)  # one fused pass over all tensors
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ---------------------------------------------------------------------------------------- helpers
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parameter_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes (equal across DDP ranks when they are in sync)."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_loss_curve(losses: Sequence[float], path: str | Path, title: str, *, record: str | Path | None = None) -> None:
    """Plot the per-step loss (log scale) and its moving average to a PNG (matplotlib Agg, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=LOSS_CURVE_SIZE_INCHES, dpi=LOSS_CURVE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    ax.plot(steps, values, linewidth=0.6, alpha=0.4, label="loss")
    window = min(LOSS_CURVE_SMOOTHING, len(values))
    if window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, linewidth=1.5, label=f"mean of {window}")
    if len(values) and np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue(), record=record)


# ------------------------------------------------------------------------------------ checkpoints
def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST_POINTER
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {folder.name}, which has no {STATE_FILE}; the run folder is damaged")
    return folder


def load_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint folder (CPU tensors)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder or a run folder with checkpoints")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc})") from exc


def read_trained_weights(
    path: str | Path, *, file_name: str, config_key: str, metadata_key: str, what: str
) -> tuple[dict[str, torch.Tensor], Any, Mapping[str, Any]] | None:
    """EMA weights, config and extras of one of *our* trained models, or None for other checkpoints.

    ``path`` is a run folder (its final ``file_name``, else its latest checkpoint's EMA), a checkpoint folder,
    or a ``.safetensors`` file. The config comes from the checkpoint's ``extra[config_key]`` (a dict) or the
    file's ``metadata[metadata_key]`` (JSON text, decoded here); extras are that ``extra`` dict or metadata.
    """
    path = Path(path)
    if path.is_dir():
        if (path / file_name).is_file():
            return read_trained_weights(path / file_name, file_name=file_name, config_key=config_key,
                                        metadata_key=metadata_key, what=what)
        folder = path if (path / STATE_FILE).is_file() else latest_checkpoint(path)
        if folder is None:
            raise CheckpointError(f"{path} holds no {file_name} and no checkpoints; is it a {what} run folder?")
        state = load_checkpoint_state(folder)
        extra = state.get("extra", {})
        if config_key not in extra:
            raise CheckpointError(f"{folder} is not a {what} checkpoint (no {config_key})")
        return dict(state["ema"]), extra[config_key], extra
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata_key not in metadata:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(metadata[metadata_key]), metadata
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (-> its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(f"{path} is neither a training run folder with checkpoints nor a checkpoint folder")


def _write_checkpoint(out_dir: Path, step: int, state: dict[str, Any], config: dict[str, Any],
                      keep: int) -> Path:
    """Write ``checkpoints/step_N/`` as a staging folder swapped into place, then point ``latest`` at it.

    Every file is listed in the run folder's ownership record; checkpoints beyond ``keep`` are removed from
    disk and from the record. A crash leaves the previous checkpoint and ``latest`` intact.
    """
    root = checkpoint_root(out_dir)
    fileio.make_folders(root)
    final = root / STEP_DIR_FORMAT.format(step)
    tmp = fileio.new_staging_folder(final)
    try:
        atomic_torch_save(state, tmp / STATE_FILE)
        atomic_write_json(tmp / CONFIG_FILE, config)
        fileio.add_owned(out_dir, [final / STATE_FILE, final / CONFIG_FILE])
        fileio.crash_point("checkpoint-staged")
        fileio.swap_into_place(tmp, final)  # same step saved twice (a resumed finished run): replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_bytes(root / LATEST_POINTER, final.name.encode(), record=out_dir)
    if keep:
        steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in steps[:-keep]:
            shutil.rmtree(old)
        fileio.remove_owned(out_dir, steps[:-keep])
    return final


# ---------------------------------------------------------------------------------------- the loop
StepFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`run_training` leaves behind."""

    out_dir: Path
    checkpoint: Path
    step: int
    finished: bool  # False when stopped early by ``max_minutes``
    ema: nn.Module  # the EMA copy (unwrapped, on the training device)
    model: nn.Module  # the trained module (unwrapped)
    losses: list[float]


def resume_mutable_fields(config: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the fields of every :class:`LoopConfig` inside ``config`` that a resume may change."""
    if isinstance(config, LoopConfig):
        return {f"{prefix}{name}" for name in RESUME_MUTABLE_LOOP_FIELDS}
    found: set[str] = set()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for field in dataclasses.fields(config):
            found |= resume_mutable_fields(getattr(config, field.name), f"{prefix}{field.name}.")
    return found


def _check_resume_config(out_dir: Path, config: Any, force: bool, log: Callable[[str], None]) -> None:
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); the run folder is damaged: start a new run") from None
    mutable = resume_mutable_fields(config)
    # A field added after the run started, at None (its "off" value), is not a change: the run behaved that way.
    changes = [c for c in config_changes(saved, config_to_dict(config))
               if c.split(":", 1)[0] not in mutable and not c.endswith(": (absent) -> null")]
    shape_changes = [c for c in changes if c.split(":", 1)[0] in ARCHITECTURE_FIELDS]
    if shape_changes:
        raise FlowTurboError(
            f"refusing to resume {out_dir}: the model architecture differs from the run's ({'; '.join(shape_changes)}); "
            "--force allows changed training settings, never another model: restore those settings or choose a "
            "new --out"
        )
    if changes and not force:
        listing = "\n  ".join(changes)
        raise FlowTurboError(
            f"refusing to resume {out_dir}: the config differs from the one it was started with:\n  {listing}\n"
            "restore those settings, choose a new output folder, or pass --force to resume anyway"
        )
    if changes:
        log("resuming with a changed config (--force):\n  " + "\n  ".join(changes))


def check_run_folder(out_dir: str | Path, config: Any, *, resume: bool, force: bool,
                     log: Callable[[str], None] = print, resume_needs_run: bool = True) -> bool:
    """Refuse early what :func:`run_training` would refuse late; returns whether a checkpoint exists.

    An output folder with checkpoints needs ``resume``; resuming with a changed config needs ``force`` (and a
    changed architecture is refused even then); ``resume`` without a checkpoint to resume from is refused
    (unless ``resume_needs_run=False``: a later stage of a run that has not started yet). A new run refuses a
    folder holding anything flowturbo did not write. Trainers call this before expensive set-up (encoding a
    dataset) so a mistake costs nothing. Then the run folder is created (rank 0) with an ownership record that
    names it a training run, so the caches and weights the trainer adds are recorded as a run's.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FlowTurboError(f"--out {out_dir} exists and is not a folder; choose another --out")
    fileio.check_kind(out_dir, kind=fileio.KIND_TRAINING_RUN)  # never into a bundle, an export, ... (kinds rule)
    existing = latest_checkpoint(out_dir)
    if existing is None and resume and resume_needs_run:
        raise FlowTurboError(
            f"--resume: {out_dir} holds no checkpoint to resume from (no run was started there, or it stopped "
            "before its first checkpoint); drop --resume to start a new run"
        )
    # The folder's content is rank 0's to tidy and judge: under torchrun another rank looking at the same time would
    # see rank 0's ownership record being written (its temp file) as an entry flowturbo did not write, and refuse.
    main_rank = rank_from_env() == 0
    if main_rank and out_dir.is_dir():  # leftovers of a killed run (temp files, staged checkpoints) are not the user's
        fileio.remove_stale_temp_files(out_dir)
        fileio.remove_stale_staging(checkpoint_root(out_dir))
    if main_rank and existing is None and out_dir.is_dir():
        unknown = fileio.unknown_entries(out_dir)
        if unknown:
            fileio.check_replaceable(out_dir, "training run folder")
    if existing is not None and not resume:
        raise FlowTurboError(
            f"{out_dir} already holds checkpoints ({existing.name}); pass --resume to continue that run "
            "or choose a new output folder"
        )
    if existing is not None:
        _check_resume_config(out_dir, config, force, log)
    if main_rank and fileio.read_ownership(out_dir) is None:  # the record names the kind from the start
        fileio.add_owned(out_dir, [], kind=fileio.KIND_TRAINING_RUN)  # (listed by a locked run folder above it)
    return existing is not None


def _check_same_architecture(model: nn.Module, saved: Mapping[str, torch.Tensor], checkpoint: Path) -> None:
    """Refuse a checkpoint whose weights do not fit ``model`` (another size), naming the first mismatches."""
    own = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in saved.items()
                if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    problems += [f"{k}: missing from the checkpoint" for k in missing] + [f"{k}: not in this model" for k in extra]
    if problems:
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FlowTurboError(
            f"cannot resume from {checkpoint}: it holds another model architecture ({listing}); --force allows "
            "changed training settings, never another model: use the run's model settings or a new --out"
        )


def run_training(
    *,
    out_dir: str | Path,
    config: Any,
    loop: LoopConfig,
    model: nn.Module,
    step_fn: StepFn,
    batches: BatchSource,
    ctx: DistContext,
    resume: bool = False,
    force: bool = False,
    extra_state: Mapping[str, Any] | None = None,
    title: str = "training",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` with ``step_fn(ddp_model, batch) -> scalar loss`` under ``loop`` and return the result.

    ``config`` (a frozen dataclass with a ``loop`` field) is written to ``config.json`` beside every
    checkpoint; a resume with a different config is refused unless ``force`` (fields in
    :data:`RESUME_MUTABLE_LOOP_FIELDS`, like ``loop.steps``, may change). Without ``resume`` an output folder that
    already holds checkpoints is refused. A non-finite loss stops training before the weights change and
    raises :class:`FlowTurboError` naming the step and the last good checkpoint. ``extra_state`` (plain data,
    e.g. the model config) is stored in every checkpoint.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    config_dict = config_to_dict(config)
    say = log if ctx.is_main else (lambda _msg: None)
    device = ctx.device
    precision = resolved_precision(loop.precision, device)
    meta = {
        "config": config_dict,
        "title": title,
        "world_size": ctx.world_size,
        "device": str(device),
        "precision": precision,
        "torch_version": torch.__version__,
    }

    check_run_folder(out_dir, config, resume=resume, force=force, log=say, resume_needs_run=False)
    existing = latest_checkpoint(out_dir)

    seed_everything(loop.seed)
    model = model.to(device)
    model.train()
    state: dict[str, Any] | None = load_checkpoint_state(existing) if existing is not None else None
    if state is not None:
        if state.get("format") != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{existing} was written by an incompatible flowturbo (format {state.get('format')})")
        if state["world_size"] != ctx.world_size and not force:
            raise FlowTurboError(
                f"{existing} was written by {state['world_size']} processes, this run has {ctx.world_size}; "
                "resume with the same number of processes or pass --force (the random streams will differ)"
            )
        _check_same_architecture(model, state["model"], existing)
        model.load_state_dict(state["model"])

    ema = EMA(model, loop.ema_decay)  # before DDP wraps (and hooks) the parameters
    ddp_model: nn.Module = model
    if ctx.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(  # broadcasts rank 0's parameters
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if state is None:
            ema.module.load_state_dict(model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise FlowTurboError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        trainable, lr=loop.lr, betas=(loop.beta1, loop.beta2), weight_decay=loop.weight_decay, foreach=True
    )
    step = 0
    losses: list[float] = []
    if state is not None:
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        losses = [float(v) for v in state["losses"]]
        batches.load_state_dict(state["data"])
        rng_states = state["rng"]
        if ctx.rank < len(rng_states):
            restore_rng_state(rng_states[ctx.rank])
        else:
            seed_everything(loop.seed + ctx.rank + step)
        say(f"resumed {out_dir} at step {step} from {existing.name}")
    else:
        seed_everything(loop.seed + ctx.rank)  # ranks draw different noise
    if ctx.is_main:
        fileio.make_folders(out_dir)
        fileio.remove_stale_temp_files(out_dir)  # leftovers of a killed run
        fileio.remove_stale_staging(checkpoint_root(out_dir))
        atomic_write_json(out_dir / CONFIG_FILE, meta, record=out_dir)
    last_checkpoint = existing

    def save(at_step: int) -> Path | None:
        rng_local = capture_rng_state()
        if ctx.distributed:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, rng_local)
            prints: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(prints, parameter_fingerprint(model))
            if len(set(prints)) != 1:
                raise FlowTurboError(f"DDP ranks diverged at step {at_step} (parameter fingerprints {prints})")
        else:
            gathered, prints = [rng_local], [parameter_fingerprint(model)]
        path = None
        if ctx.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT_VERSION,
                "step": at_step,
                "model": unwrap(model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "losses": list(losses),
                "data": batches.state_dict(),
                "rng": gathered,
                "world_size": ctx.world_size,
                "rank_fingerprints": prints,
                "extra": dict(extra_state or {}),
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }
            path = _write_checkpoint(out_dir, at_step, payload, meta, loop.keep_checkpoints)
            save_loss_curve(losses, out_dir / LOSS_CURVE_FILE, title, record=out_dir)
        ctx.barrier()
        return path if ctx.is_main else checkpoint_root(out_dir) / STEP_DIR_FORMAT.format(at_step)

    autocast = autocast_context(loop.precision, device)
    start_time = time.monotonic()
    budget_s = loop.max_minutes * SECONDS_PER_MINUTE if loop.max_minutes is not None else None
    bar = tqdm(total=loop.steps, initial=min(step, loop.steps), desc=title, disable=not (loop.progress and ctx.is_main),
               dynamic_ncols=True)
    finished = step >= loop.steps
    stopped_by_budget = False
    window_start, window_steps = time.monotonic(), 0
    try:
        while step < loop.steps:
            batch = batches.next_batch()
            for group in optimizer.param_groups:
                group["lr"] = loop.lr * min(1.0, (step + 1) / loop.warmup_steps) if loop.warmup_steps else loop.lr
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = step_fn(ddp_model, batch)
            loss.backward()
            stop_early = budget_s is not None and time.monotonic() - start_time >= budget_s
            report = torch.stack([loss.detach().float(), torch.tensor(float(stop_early), device=loss.device)])
            if ctx.distributed:
                dist.all_reduce(report)
                report[0] /= ctx.world_size
            loss_value, stop_votes = report.tolist()
            if not math.isfinite(loss_value):
                where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                         else "no checkpoint was saved yet")
                if ctx.is_main and losses:
                    save_loss_curve(losses, out_dir / LOSS_CURVE_FILE, title, record=out_dir)
                raise FlowTurboError(
                    f"{title}: the loss became {loss_value} at step {step + 1}; stopped before updating the weights "
                    f"({where}). Resume from it with a lower --lr or a smaller --grad-clip"
                )
            if loop.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, loop.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
            losses.append(loss_value)
            window_steps += 1
            bar.update(1)
            if step % loop.log_every == 0 or step == loop.steps:
                now = time.monotonic()
                rate = window_steps * loop.batch_size / max(now - window_start, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4g}", samples_s=f"{rate:.1f}")
                window_start, window_steps = now, 0
            if stop_votes > 0 and step < loop.steps:
                last_checkpoint = save(step)
                stopped_by_budget = True
                then = ("the run ends here (budget_ends_run)" if loop.budget_ends_run
                        else "Run again with --resume to continue")
                say(f"{title}: max_minutes={loop.max_minutes} reached at step {step}/{loop.steps}; saved "
                    f"{last_checkpoint}. {then}")
                break
            if step % loop.ckpt_every == 0 or step == loop.steps:
                last_checkpoint = save(step)
        finished = step >= loop.steps or (stopped_by_budget and loop.budget_ends_run)
    finally:
        bar.close()
    if finished and losses:
        say(f"{title}: {step} steps done, last loss {losses[-1]:.4g}")
    if last_checkpoint is None:  # resumed a run that had already finished but never saved (impossible) or 0 steps
        last_checkpoint = save(step)
    return TrainResult(
        out_dir=out_dir, checkpoint=last_checkpoint, step=step, finished=finished,
        ema=ema.module, model=unwrap(model), losses=losses,
    )
