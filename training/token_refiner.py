"""The FlowTurbo velocity refiner for token-sequence text-to-image transformers (SD3 / SD3.5, FLUX.1).

The SiT refiner (:class:`flowturbo.training.models.VelocityRefiner`) is conditioned on a class id and works on
one fixed square latent size. A diffusers flow-matching teacher is conditioned on text and samples any size its
position embedding covers, so its refiner is its own small model, :class:`TokenRefiner`:

    r(x, t, v, pooled [, dt]) -> offset,   all of x, v, offset (B, C, h, w) on flowturbo's time axis

* tokens: the state ``x`` and the carried velocity ``v`` stacked on channels (2C) and cut into the teacher's
  ``p x p`` latent patches (SD3: its patch size; FLUX: its 2x2 packing), a linear embedding plus a fixed 2-D
  sin-cos position embedding computed for the grid of the request (rectangular sizes included);
* conditioning ``c = emb(t) + mlp(pooled) [+ emb(dt)]``: the time, the prompt's *pooled* text embedding (SD3:
  both CLIP projections; FLUX: CLIP's pooler) and the velocity age (``docs/refiner_dt.md``) — no cross-attention
  to the prompt's tokens: the carried velocity already holds what the teacher read from them;
* one (``depth``) adaLN-Zero transformer block — the SiT block, so the fast path's fused Triton adaLN kernels run
  it — and an adaLN final layer whose output starts at zero: a fresh refiner's offset is exactly 0, i.e. an R
  step reuses the carried velocity (what "the same schedule without a refiner" means in QUALITY.md).

The refiner corrects the *guided* velocity: it is trained on the teacher's CFG-combined (or distilled-guidance)
velocity at one guidance setting, recorded with its weights (:class:`TokenRefinerRecord`), and returns B rows
that the solver ops take as already guided. Weights are saved as safetensors with the config, the teacher
pipeline's identity (class, transformer config digest), the guidance it was trained at and the dt distribution
(``refiner_dt``) as metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.kernels import KernelBackend
from flowturbo.refiner_dt import REFINER_DT_KEY, DtDistribution, read_dt_record
from flowturbo.training.checkpoints import atomic_save_safetensors
from flowturbo.training.models import (
    EMBEDDING_INIT_STD,
    FinalLayer,
    PatchEmbed,
    PendingResidual,
    SiTBlock,
    TimestepEmbedder,
    sincos_pos_embed_2d,
)

TOKEN_REFINER_FILE = "refiner.safetensors"
CONFIG_KEY = "token_refiner_config"
RECORD_KEY = "token_refiner_teacher"
KIND = "token-refiner"  # the "kind" of the weights' metadata: never mistaken for a SiT refiner


@dataclasses.dataclass(frozen=True)
class TokenRefinerConfig:
    """The architecture of a :class:`TokenRefiner` (module docstring)."""

    latent_channels: int  # C of the solver state (SD3 / FLUX: 16)
    patch_size: int  # latent pixels per token side (the teacher's patch; FLUX: 2, its packing)
    pooled_dim: int  # width of the pooled text embedding (SD3: 2048; FLUX: 768)
    hidden_size: int = 256
    num_heads: int = 4
    depth: int = 1
    mlp_ratio: float = 4.0
    dt_conditioning: bool = True

    def __post_init__(self) -> None:
        for name in ("latent_channels", "patch_size", "pooled_dim", "hidden_size", "num_heads", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlowTurboError(f"token refiner {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise FlowTurboError(f"token refiner hidden_size {self.hidden_size} must be a multiple of num_heads "
                                 f"({self.num_heads}) and of 4 (the 2-D position embedding)")
        if not self.mlp_ratio > 0:
            raise FlowTurboError(f"token refiner mlp_ratio must be positive, got {self.mlp_ratio}")

    def describe(self) -> str:
        return (f"token refiner depth {self.depth}, hidden {self.hidden_size}, {self.num_heads} heads, "
                f"{self.patch_size}x{self.patch_size} patches of {self.latent_channels} channels"
                f"{', dt-conditioned' if self.dt_conditioning else ''}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenRefinerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"unknown token refiner config keys {unknown}")
        return cls(**data)


class TokenRefiner(nn.Module):
    """``r(x, t, v, pooled [, dt])``: the velocity offset of a token-sequence teacher (module docstring)."""

    def __init__(self, config: TokenRefinerConfig,
                 kernel_backend: KernelBackend | str = KernelBackend.REFERENCE) -> None:
        super().__init__()
        self.config = config
        self.kernel_backend = KernelBackend.coerce(kernel_backend)
        d = config.hidden_size
        self.x_embedder = PatchEmbed(2 * config.latent_channels, d, config.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.pooled_embedder = nn.Sequential(nn.Linear(config.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.dt_embedder = TimestepEmbedder(d) if config.dt_conditioning else None
        self.blocks = nn.ModuleList([SiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])
        self.final_layer = FinalLayer(d, config.patch_size, config.latent_channels)
        self._positions: dict[tuple[int, int, str], torch.Tensor] = {}
        self.initialize_weights()

    @property
    def takes_dt(self) -> bool:
        """Whether the refiner has a velocity-age input (``dt``)."""
        return self.dt_embedder is not None

    def set_kernel_backend(self, backend: KernelBackend | str) -> "TokenRefiner":
        """Choose the adaLN kernel implementation (``"reference"`` or ``"triton"``); returns self."""
        self.kernel_backend = KernelBackend.coerce(backend)
        return self

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT initialisation; the adaLN-Zero layers, the output and the dt embedding's output start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for embedder in (self.t_embedder, self.dt_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=EMBEDDING_INIT_STD)
                nn.init.normal_(embedder.mlp[2].weight, std=EMBEDDING_INIT_STD)
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        zero += [self.dt_embedder.mlp[2]] if self.dt_embedder is not None else []
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _position(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (rows, cols, f"{like.device}/{like.dtype}")
        found = self._positions.get(key)
        if found is None:
            found = sincos_pos_embed_2d(self.config.hidden_size, rows, grid_width=cols).to(like)  # (T, D)
            self._positions[key] = found
        return found

    def _check(self, x: torch.Tensor, v: torch.Tensor, pooled: torch.Tensor) -> None:
        c, p = self.config.latent_channels, self.config.patch_size
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] % p or x.shape[3] % p:
            raise FlowTurboError(f"TokenRefiner expects latents (B, {c}, h, w) with h and w multiples of {p}, got "
                                 f"{tuple(x.shape)}")
        if tuple(v.shape) != tuple(x.shape):
            raise FlowTurboError(f"TokenRefiner: the carried velocity {tuple(v.shape)} must match x {tuple(x.shape)} "
                                 "(a guided velocity: B rows)")
        if pooled.dim() != 2 or pooled.shape[0] != x.shape[0] or pooled.shape[1] != self.config.pooled_dim:
            raise FlowTurboError(f"TokenRefiner expects pooled text embeddings ({x.shape[0]}, "
                                 f"{self.config.pooled_dim}), got {tuple(pooled.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, pooled: torch.Tensor,
                dt: torch.Tensor | None = None) -> torch.Tensor:
        """x, v: (B, C, h, w); t: (B,) or scalar in [0, 1]; pooled: (B, P); dt: (B,) or scalar velocity age
        (required exactly when the refiner is dt-conditioned) -> offset (B, C, h, w)."""
        self._check(x, v, pooled)
        if (dt is None) == self.takes_dt:
            raise FlowTurboError("this token refiner is dt-conditioned: pass dt (the velocity age)" if self.takes_dt
                                 else "this token refiner has no dt input; call it without dt")
        b, c, height, width = x.shape
        p = self.config.patch_size
        rows, cols = height // p, width // p
        weight_dtype = self.x_embedder.proj.weight.dtype
        t = t.expand(b) if t.dim() == 0 else t
        tokens = self.x_embedder(torch.cat([x, v], dim=1).to(weight_dtype))  # (B, T, D)
        tokens = tokens + self._position(rows, cols, tokens)
        cond = self.t_embedder(t) + self.pooled_embedder(pooled.to(weight_dtype))  # (B, D)
        if dt is not None:
            cond = cond + self.dt_embedder(dt.expand(b) if dt.dim() == 0 else dt)  # type: ignore[misc]
        pending: PendingResidual | None = None
        for block in self.blocks:
            tokens, pending = block.forward_chained(tokens, cond, pending, self.kernel_backend)  # (B, T, D)
        out = self.final_layer(tokens, cond, pending, self.kernel_backend)  # (B, T, p*p*C)
        out = out.reshape(b, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, p, cols, p)
        return out.reshape(b, c, height, width)


# ---------------------------------------------------------------------------------------------- the record
@dataclasses.dataclass(frozen=True)
class TokenRefinerRecord:
    """What a token refiner was trained against: the teacher pipeline and the guidance it corrects."""

    pipeline_class: str  # model_index.json's _class_name
    transformer_digest: str  # sha256 of the teacher transformer's config (architecture identity)
    pipeline: str  # the teacher folder as given at training time (informative)
    cfg: float  # the CFG scale of the velocity it corrects (1: none)
    guidance: float | None  # the distilled guidance value (FLUX.1-dev), else None
    size: str  # the image size it was trained at, WIDTHxHEIGHT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def transformer_digest(config: dict[str, Any]) -> str:
    """A digest of a diffusers transformer config (keys starting with ``_`` -- versions, paths -- ignored)."""
    data = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TrainedTokenRefiner:
    """A token refiner read back: weights, config, record and trained dt distribution."""

    state: dict[str, torch.Tensor] = dataclasses.field(repr=False)
    config: TokenRefinerConfig
    record: TokenRefinerRecord
    dt: DtDistribution | None

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              kernel_backend: KernelBackend | str = KernelBackend.REFERENCE) -> TokenRefiner:
        """The refiner module, eval mode, frozen, on ``device`` in ``dtype``."""
        refiner = TokenRefiner(self.config, kernel_backend)
        missing, unexpected = refiner.load_state_dict(self.state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"token refiner weights do not fit {self.config.describe()}: missing "
                                  f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        return refiner.to(device=device, dtype=dtype).eval().requires_grad_(False)


def write_token_refiner(path: Path, refiner: TokenRefiner, record: TokenRefinerRecord,
                        distribution: DtDistribution, *, record_folder: Path | None = None) -> None:
    """Save a token refiner's weights with its config, teacher record and trained dt (safetensors metadata)."""
    metadata = {"kind": KIND, CONFIG_KEY: json.dumps(refiner.config.to_dict()),
                RECORD_KEY: json.dumps(record.to_dict()), REFINER_DT_KEY: json.dumps(distribution.to_dict())}
    state = {k: v.detach().float().contiguous() for k, v in refiner.state_dict().items()}
    atomic_save_safetensors(state, path, metadata, record=record_folder)


def is_token_refiner(path: str | Path) -> bool:
    """Whether ``path`` (a ``refiner.safetensors`` or a folder holding one) is a token refiner's weights."""
    file = Path(path) / TOKEN_REFINER_FILE if Path(path).is_dir() else Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return (handle.metadata() or {}).get("kind") == KIND
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours
        return False


def read_token_refiner(path: str | Path, flag: str = "--refiner") -> TrainedTokenRefiner:
    """A token refiner from a ``train refiner --teacher PIPELINE`` run folder or its ``refiner.safetensors``."""
    from safetensors import safe_open

    source = Path(path)
    file = source / TOKEN_REFINER_FILE if source.is_dir() else source
    if not file.is_file():
        hint = " (the run has not finished: resume it, or pass a checkpoint's weights)" if source.is_dir() else ""
        raise CheckpointError(f"{flag} {source}: no {TOKEN_REFINER_FILE} found{hint}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{flag} {file} is not a readable safetensors file: {exc}") from None
    if metadata.get("kind") != KIND:
        raise CheckpointError(f"{flag} {file} is not a text-to-image (token) refiner; train one with `flowturbo "
                              "train refiner --teacher PIPELINE_FOLDER --prompts FILE`")
    try:
        config = TokenRefinerConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
        record = TokenRefinerRecord(**json.loads(metadata[RECORD_KEY]))
        dt = read_dt_record(json.loads(metadata[REFINER_DT_KEY])) if REFINER_DT_KEY in metadata else None
    except (KeyError, TypeError, ValueError, FlowTurboError) as exc:
        raise CheckpointError(f"{flag} {file}: unreadable token refiner metadata ({exc})") from None
    return TrainedTokenRefiner(state, config, record, dt)


def call_flops(module: Any, *args: Any, **kwargs: Any) -> int:
    """Floating-point operations of one call (``torch.utils.flop_counter``; matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


__all__ = [
    "TOKEN_REFINER_FILE",
    "TokenRefiner",
    "TokenRefinerConfig",
    "TokenRefinerRecord",
    "TrainedTokenRefiner",
    "call_flops",
    "is_token_refiner",
    "read_token_refiner",
    "transformer_digest",
    "write_token_refiner",
]
