"""SiT predictors (S/B/L/XL x patch 2/4/8, small CPU configs) and the FlowTurbo velocity refiner.

Parameter names follow the official SiT/DiT layout (``willisma/SiT`` ``models.py``) so official checkpoints
load with ``strict=True``::

    x_embedder.proj.{weight,bias}                 Conv2d patchify (D, C_in, p, p)
    t_embedder.mlp.{0,2}.{weight,bias}            256-d sinusoid -> D -> D (SiLU between)
    y_embedder.embedding_table.weight             (num_classes + 1, D); row num_classes = null label
    pos_embed                                     (1, T, D) fixed 2-D sin-cos, a Parameter without grad
    blocks.N.attn.qkv / attn.proj                 Linear with bias
    blocks.N.mlp.fc1 / mlp.fc2                    Linear, GELU (tanh approximation) between
    blocks.N.adaLN_modulation.1                   Linear D -> 6D after SiLU
    final_layer.linear                            Linear D -> p*p*out_channels
    final_layer.adaLN_modulation.1                Linear D -> 2D after SiLU

The LayerNorms (``norm1``, ``norm2``, ``norm_final``) have no affine parameters and hence no keys; here
they are folded into the adaLN kernels of :mod:`flowturbo.kernels` (``layernorm_modulate`` and
``gated_residual_layernorm_modulate``), which is where a fused Triton backend plugs in.

Block fusion (the residual stream is carried between blocks with its last update still *pending*)::

    block k:  x, h = gated_residual_ln_mod(x, m_{k-1}, gate_mlp_{k-1}, shift_msa_k, scale_msa_k)   # or ln_mod
              a    = attn(h)
              x, h = gated_residual_ln_mod(x, a, gate_msa_k, shift_mlp_k, scale_mlp_k)
              m_k  = mlp(h)                       # pending: x + gate_mlp_k * m_k, fused into the next norm
    final:    _, h = gated_residual_ln_mod(x, m_last, gate_mlp_last, shift, scale); out = linear(h)

This is exactly DiT's ``x = x + g * f(modulate(norm(x), shift, scale))`` with every residual add fused into
the following LayerNorm + modulate: one memory pass per half-block instead of three.

The refiner mirrors FlowTurbo's released refiner (``shiml20/FlowTurbo`` ``train.py``:
``VelocityPredictor(depth=1, in_channels_scale=2, ...)``, sampled by ``VelocityRefinerBlock`` in
``models_assemble.py``): the same key layout with one block, ``x_embedder.proj`` over ``concat(x, v)``
(2C input channels), and — like the predictor — ``learn_sigma=True`` by default, i.e.
``final_layer.linear`` has ``p*p*2C`` rows of which the first C channels are the velocity offset.

**dt conditioning** (beyond the paper, ``RefinerConfig.dt_conditioning``): the refiner may also take the age
``dt`` of the velocity it corrects (``flowturbo.integrator``, *The refiner's dt*; ``docs/refiner_dt.md``). It is
embedded by ``dt_embedder`` (a :class:`TimestepEmbedder` like ``t_embedder``: keys ``dt_embedder.mlp.{0,2}``)
and added to the conditioning, ``c = t_emb + y_emb + dt_emb``; its last linear layer starts at zero, so a fresh
dt refiner computes exactly what the same weights without ``dt_embedder`` compute. A refiner without it keeps
the official key layout (official refiner ``.pt`` files load with ``strict=True``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowturbo.errors import FlowTurboError
from flowturbo.kernels import KernelBackend, gated_residual_layernorm_modulate, layernorm_modulate
from flowturbo.kernels.adaln import ADALN_EPS  # the one adaLN LayerNorm eps, shared with the kernels

# ------------------------------------------------------------------------------------------- constants
FREQUENCY_EMBEDDING_DIM = 256  # sinusoidal timestep features fed to t_embedder.mlp.0
TIMESTEP_MAX_PERIOD = 10_000  # lowest frequency of the timestep sinusoids
POS_EMBED_MAX_PERIOD = 10_000  # lowest frequency of the 2-D sin-cos position embedding
EMBEDDING_INIT_STD = 0.02  # DiT init of the label table and the timestep MLP
MODULATION_CHUNKS = 6  # shift/scale/gate for the attention half and the MLP half
FINAL_MODULATION_CHUNKS = 2  # shift/scale of the final layer
RANDOM_ZERO_INIT_STD = 0.02  # noise given to zero-initialised layers by perturb_zero_initialized

# ------------------------------------------------------------------------------------------- presets
# (hidden_size, depth, num_heads); published SiT/DiT sizes.
SIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "SiT-S": (384, 12, 6),
    "SiT-B": (768, 12, 12),
    "SiT-L": (1024, 24, 16),
    "SiT-XL": (1152, 28, 16),
}
SIT_PATCH_SIZES: tuple[int, ...] = (2, 4, 8)
# Small configs for CPU tests and the embedded default model.
SMALL_SIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "SiT-T": (192, 6, 3),
    "SiT-M": (256, 8, 4),
    # Narrow and deep: the embedded default. One refiner block is ~1/12 of the predictor's compute (the
    # paper's SiT-XL/2 refiner is ~1/28 of its blocks), and the weights stay small enough to ship.
    "SiT-N": (128, 12, 4),
}
SMALL_SIT_PATCH_SIZES: tuple[int, ...] = (1, 2, 4)


def _build_presets() -> dict[str, dict[str, int]]:
    presets: dict[str, dict[str, int]] = {}
    for archs, patches in ((SIT_ARCHS, SIT_PATCH_SIZES), (SMALL_SIT_ARCHS, SMALL_SIT_PATCH_SIZES)):
        for arch, (hidden, depth, heads) in archs.items():
            for patch in patches:
                presets[f"{arch}/{patch}"] = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=patch)
    return presets


SIT_PRESETS: dict[str, dict[str, int]] = _build_presets()
"""Preset name (``"SiT-XL/2"``) -> ``hidden_size``, ``depth``, ``num_heads``, ``patch_size``."""

HEADS_BY_HIDDEN_SIZE: dict[int, int] = {
    hidden: heads for archs in (SIT_ARCHS, SMALL_SIT_ARCHS) for hidden, _, heads in archs.values()
}
"""Head count of the preset with a given width (used when a checkpoint does not say)."""


# -------------------------------------------------------------------------------------------- configs
def _check_positive_ints(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlowTurboError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _check_common(owner: str, cfg: Any) -> None:
    _check_positive_ints(
        owner,
        input_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=cfg.num_classes,
    )
    if cfg.input_size % cfg.patch_size:
        raise FlowTurboError(
            f"{owner}: input_size {cfg.input_size} is not a multiple of patch_size {cfg.patch_size}; "
            "choose a latent size divisible by the patch size"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise FlowTurboError(f"{owner}: hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.hidden_size % 4:
        raise FlowTurboError(f"{owner}: hidden_size must be a multiple of 4 (2-D sin-cos position embedding)")
    if not (isinstance(cfg.mlp_ratio, (int, float)) and cfg.mlp_ratio > 0):
        raise FlowTurboError(f"{owner}.mlp_ratio must be a positive number, got {cfg.mlp_ratio!r}")
    if not (0.0 <= cfg.class_dropout_prob < 1.0):
        raise FlowTurboError(f"{owner}.class_dropout_prob must be in [0, 1), got {cfg.class_dropout_prob!r}")


def _config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        raise FlowTurboError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FlowTurboError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(fields)}")
    required = [
        n for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise FlowTurboError(f"{cls.__name__} is missing required keys {missing}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class SiTConfig:
    """Architecture of a SiT predictor. ``input_size`` is the latent height = width."""

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        _check_common("SiTConfig", self)

    @property
    def out_channels(self) -> int:
        """Channels of the raw output: ``2 * in_channels`` with ``learn_sigma`` (first half = velocity)."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Tokens per side: ``input_size // patch_size``."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Sequence length T."""
        return self.grid_size**2

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the extra null (unconditional) row used for CFG."""
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int | None:
        """Label id of the null class (``num_classes``), or None when there is no null row."""
        return self.num_classes if self.has_null_class else None

    @property
    def preset_name(self) -> str | None:
        """``"SiT-XL/2"`` when the width/depth/heads/patch/mlp_ratio match a preset, else None."""
        for name, preset in SIT_PRESETS.items():
            if self.mlp_ratio == 4.0 and all(getattr(self, k) == v for k, v in preset.items()):
                return name
        return None

    def describe(self) -> str:
        """Human-readable name, e.g. ``"SiT-XL/2 (32x32x4 latents, 1000 classes)"``."""
        arch = self.preset_name or (
            f"custom SiT (hidden {self.hidden_size}, depth {self.depth}, heads {self.num_heads}, "
            f"patch {self.patch_size}, mlp_ratio {self.mlp_ratio})"
        )
        return f"{arch} ({self.input_size}x{self.input_size}x{self.in_channels} latents, {self.num_classes} classes)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SiTConfig":
        return _config_from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """Architecture of a FlowTurbo velocity refiner (one SiT block over ``concat(x, v)``).

    ``learn_sigma=True`` mirrors the released refiner, whose final layer has ``2 * in_channels`` output
    channels of which only the first ``in_channels`` are used.
    """

    input_size: int
    patch_size: int
    in_channels: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    depth: int = 1
    learn_sigma: bool = True
    dt_conditioning: bool = False  # a dt_embedder: the refiner takes the age of its velocity (module docstring)

    def __post_init__(self) -> None:
        _check_common("RefinerConfig", self)
        if not isinstance(self.dt_conditioning, bool):
            raise FlowTurboError(f"RefinerConfig.dt_conditioning must be true or false, got {self.dt_conditioning!r}")

    @classmethod
    def for_predictor(cls, predictor: SiTConfig, *, depth: int = 1, dt_conditioning: bool = False) -> "RefinerConfig":
        """The paper's refiner for ``predictor``: same width, heads, patch, classes; ``depth`` blocks; with
        ``dt_conditioning`` a step-size (velocity age) embedding too."""
        return cls(
            input_size=predictor.input_size,
            patch_size=predictor.patch_size,
            in_channels=predictor.in_channels,
            hidden_size=predictor.hidden_size,
            num_heads=predictor.num_heads,
            mlp_ratio=predictor.mlp_ratio,
            num_classes=predictor.num_classes,
            class_dropout_prob=predictor.class_dropout_prob,
            depth=depth,
            learn_sigma=predictor.learn_sigma,
            dt_conditioning=dt_conditioning,
        )

    @property
    def embed_channels(self) -> int:
        """Input channels of the patch embedding: ``2 * in_channels`` (x and v concatenated)."""
        return 2 * self.in_channels

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def describe(self) -> str:
        dt = ", dt-conditioned" if self.dt_conditioning else ""
        return (
            f"velocity refiner (hidden {self.hidden_size}, depth {self.depth}, heads {self.num_heads}, "
            f"patch {self.patch_size}{dt}; {self.input_size}x{self.input_size}x{self.in_channels} latents, "
            f"{self.num_classes} classes)"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefinerConfig":
        return _config_from_dict(cls, data)


def sit_config(
    name: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
) -> SiTConfig:
    """Config of a named preset (``"SiT-XL/2"``, ``"SiT-T/2"``, ...); see :data:`SIT_PRESETS`."""
    preset = SIT_PRESETS.get(name)
    if preset is None:
        raise FlowTurboError(f"unknown SiT preset {name!r}; valid names: {', '.join(SIT_PRESETS)}")
    return SiTConfig(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
        **preset,
    )


# --------------------------------------------------------------------------------------- embeddings
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features of (fractional) timesteps: ``[cos(t w_i), sin(t w_i)]``; (N,) -> (N, dim) fp32."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, max_period: float = POS_EMBED_MAX_PERIOD, *,
                        grid_width: int | None = None) -> torch.Tensor:
    """MAE/DiT fixed 2-D sin-cos position embedding, (grid_size * grid_width, embed_dim) float32.

    Token ``k = i * grid_width + j`` (row i, column j) gets ``[sin(j w), cos(j w), sin(i w), cos(i w)]``
    with ``w_m = max_period ** (-m / (embed_dim / 4))``, computed in float64 like the official code.
    ``grid_width`` (None: square, ``grid_size``) gives rectangular grids of ``grid_size`` rows.
    """
    if embed_dim % 4:
        raise FlowTurboError(f"2-D sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / max_period ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size if grid_width is None else grid_width, dtype=torch.float64),
                                indexing="ij")  # (G, W) each

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]  # (G*W, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (G*W, D/2)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()  # (G*W, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (N, C, H, W) -> (N, T, D), contiguous.

    The copy to a contiguous (N, T, D) is deliberate: the fused adaLN kernels take a contiguous residual
    stream, and every later residual update keeps that layout.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> (N, D): sinusoid features then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_DIM) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class id -> (N, D). Row ``num_classes`` (present when ``class_dropout_prob > 0``) is the null label.

    No random label dropout happens here: training code replaces labels by the null id itself (or passes
    ``force_drop_ids``), so the forward pass is deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.has_null_class = class_dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            if not self.has_null_class:
                raise FlowTurboError("force_drop_ids needs a null class; this model has class_dropout_prob == 0")
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        return self.embedding_table(labels)  # (N, D)


# ------------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head self-attention with fused qkv projection (timm key layout: ``qkv``, ``proj``)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (timm key layout)."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=True)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PendingResidual(NamedTuple):
    """A residual update ``x + gate[:, None] * update`` not yet applied (fused into the next LayerNorm)."""

    update: torch.Tensor  # (N, T, D)
    gate: torch.Tensor  # (N, D)


def apply_pending(x: torch.Tensor, pending: PendingResidual | None) -> torch.Tensor:
    """Materialise the residual stream: ``x + gate * update`` (plain PyTorch, for callers outside the chain)."""
    if pending is None:
        return x
    return x + pending.gate[:, None, :] * pending.update


def _normalize_modulate(
    x: torch.Tensor,
    pending: PendingResidual | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    backend: KernelBackend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a pending residual (if any) and ``LN(x) * (1 + scale) + shift``; returns ``(x, modulated)``."""
    if pending is None:
        return x, layernorm_modulate(x, shift, scale, ADALN_EPS, backend=backend)
    return gated_residual_layernorm_modulate(x, pending.update, pending.gate, shift, scale, ADALN_EPS, backend=backend)


class SiTBlock(nn.Module):
    """A SiT/DiT block with adaLN-Zero conditioning; its norms live in the fused adaLN kernels."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, MODULATION_CHUNKS * hidden_size))

    def forward_chained(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        pending: PendingResidual | None,
        backend: KernelBackend = KernelBackend.REFERENCE,
    ) -> tuple[torch.Tensor, PendingResidual]:
        """One block with the previous block's MLP residual fused into norm1 and its own left pending.

        x: (N, T, D) residual stream (without ``pending`` applied); c: (N, D) conditioning.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            MODULATION_CHUNKS, dim=1
        )  # (N, D) each
        x, h = _normalize_modulate(x, pending, shift_msa, scale_msa, backend)  # (N, T, D) x2
        attn_out = self.attn(h)  # (N, T, D)
        x, h = gated_residual_layernorm_modulate(
            x, attn_out, gate_msa, shift_mlp, scale_mlp, ADALN_EPS, backend=backend
        )  # (N, T, D) x2
        return x, PendingResidual(self.mlp(h), gate_mlp)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, backend: KernelBackend = KernelBackend.REFERENCE
    ) -> torch.Tensor:
        """Stand-alone block: (N, T, D) -> (N, T, D) with both residuals applied."""
        x, pending = self.forward_chained(x, c, None, backend)
        return apply_pending(x, pending)


class FinalLayer(nn.Module):
    """adaLN-modulated final LayerNorm + linear projection to ``p * p * out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, FINAL_MODULATION_CHUNKS * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        pending: PendingResidual | None = None,
        backend: KernelBackend = KernelBackend.REFERENCE,
    ) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(FINAL_MODULATION_CHUNKS, dim=1)  # (N, D) each
        _, h = _normalize_modulate(x, pending, shift, scale, backend)  # (N, T, D)
        return self.linear(h)  # (N, T, p*p*out)


# ------------------------------------------------------------------------------------------ backbone
class _AdaLNTransformer(nn.Module):
    """Shared body of :class:`SiT` and :class:`VelocityRefiner` (official key layout at the top level)."""

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        embed_channels: int,
        out_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_classes: int,
        class_dropout_prob: float,
        kernel_backend: KernelBackend | str,
        dt_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_backend = KernelBackend.coerce(kernel_backend)
        self.input_size = input_size
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.embed_channels = embed_channels
        self.grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(embed_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding; kept as a grad-free Parameter because official checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        # The refiner's velocity-age embedding (module docstring); None: no dt input (official layout).
        self.dt_embedder = TimestepEmbedder(hidden_size) if dt_conditioning else None
        self.initialize_weights()

    def set_kernel_backend(self, backend: KernelBackend | str) -> "_AdaLNTransformer":
        """Choose the adaLN kernel implementation (``"reference"`` or ``"triton"``); returns self."""
        self.kernel_backend = KernelBackend.coerce(backend)
        return self

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)  # (T, D) on CPU
        self.pos_embed.copy_(pos.unsqueeze(0).to(self.pos_embed.device))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1), generator=generator)  # like a Linear
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBEDDING_INIT_STD, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBEDDING_INIT_STD, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBEDDING_INIT_STD, generator=generator)
        if self.dt_embedder is not None:
            nn.init.normal_(self.dt_embedder.mlp[0].weight, std=EMBEDDING_INIT_STD, generator=generator)
        for layer in self.zero_initialized_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def zero_initialized_layers(self) -> list[nn.Linear]:
        """The adaLN-Zero layers: every block's modulation, the final modulation and the output linear (and the
        dt embedding's output layer, so a fresh dt refiner ignores dt)."""
        layers: list[nn.Linear] = [block.adaLN_modulation[-1] for block in self.blocks]
        layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        return layers + ([self.dt_embedder.mlp[2]] if self.dt_embedder is not None else [])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); token order row-major, channel fastest within a patch."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(n, g, g, p, p, c)  # (N, h, w, p, q, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, q)
        return x.reshape(n, c, g * p, g * p)

    def _check_input(self, x: torch.Tensor, what: str, channels: int) -> None:
        expected = (channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise FlowTurboError(
                f"{type(self).__name__} expects {what} of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(x.shape)}"
            )

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None,
        dt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patchify ``x`` (N, embed_channels, H, W), run the blocks, return (N, out_channels, H, W).

        ``dt`` (N,) or scalar: the velocity age, embedded by ``dt_embedder`` (refiners with dt conditioning only).
        """
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        backend = self.kernel_backend
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)  # (N, D)
        if dt is not None:
            c = c + self.dt_embedder(dt.expand(x.shape[0]) if dt.dim() == 0 else dt)  # (N, D)
        pending: PendingResidual | None = None
        for block in self.blocks:
            tokens, pending = block.forward_chained(tokens, c, pending, backend)  # (N, T, D)
        out = self.final_layer(tokens, c, pending, backend)  # (N, T, p*p*out)
        return self.unpatchify(out)  # (N, out, H, W)


class SiT(_AdaLNTransformer):
    """Scalable Interpolant Transformer (velocity predictor on the linear path, t=0 noise, t=1 data)."""

    def __init__(self, config: SiTConfig, kernel_backend: KernelBackend | str = KernelBackend.REFERENCE) -> None:
        if not isinstance(config, SiTConfig):
            raise FlowTurboError(f"SiT needs a SiTConfig (see sit_config()), got {type(config).__name__}")
        super().__init__(
            input_size=config.input_size,
            patch_size=config.patch_size,
            embed_channels=config.in_channels,
            out_channels=config.out_channels,
            hidden_size=config.hidden_size,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=config.num_classes,
            class_dropout_prob=config.class_dropout_prob,
            kernel_backend=kernel_backend,
        )
        self.config = config
        self.in_channels = config.in_channels

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents; t: (N,) in [0, 1]; y: (N,) long labels -> (N, out_channels, H, W)."""
        self._check_input(x, "x", self.config.in_channels)
        return self._run(x, t, y, force_drop_ids)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The velocity: the first ``in_channels`` output channels, (N, C, H, W)."""
        return self.forward(x, t, y)[:, : self.config.in_channels]


class VelocityRefiner(_AdaLNTransformer):
    """FlowTurbo's lightweight velocity refiner: ``r(x, t, v)`` — or ``r(x, t, v, dt)`` with
    ``config.dt_conditioning`` — the offset added to a carried velocity.

    The dt input is strict both ways: a dt-conditioned refiner needs ``dt``, a refiner without dt conditioning
    refuses one (:class:`FlowTurboError` naming the fix), so a caller never silently feeds a step size to a model
    that ignores it or drops one a model needs. Callers that serve both kinds ask :attr:`takes_dt` (or
    :func:`refiner_takes_dt` for any callable).
    """

    def __init__(
        self, config: RefinerConfig, kernel_backend: KernelBackend | str = KernelBackend.REFERENCE
    ) -> None:
        if not isinstance(config, RefinerConfig):
            raise FlowTurboError(
                f"VelocityRefiner needs a RefinerConfig (RefinerConfig.for_predictor(...)), got {type(config).__name__}"
            )
        super().__init__(
            input_size=config.input_size,
            patch_size=config.patch_size,
            embed_channels=config.embed_channels,
            out_channels=config.out_channels,
            hidden_size=config.hidden_size,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=config.num_classes,
            class_dropout_prob=config.class_dropout_prob,
            kernel_backend=kernel_backend,
            dt_conditioning=config.dt_conditioning,
        )
        self.config = config
        self.in_channels = config.in_channels

    @property
    def takes_dt(self) -> bool:
        """Whether :meth:`forward` takes (and needs) the velocity age ``dt``."""
        return self.config.dt_conditioning

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        v: torch.Tensor,
        dt: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, v: (N, C, H, W); t: (N,); y: (N,); dt: (N,) velocity age (dt-conditioned refiners only)
        -> velocity offset (N, C, H, W)."""
        channels = self.config.in_channels
        self._check_input(x, "x", channels)
        self._check_input(v, "v", channels)
        if self.takes_dt and dt is None:
            raise FlowTurboError(
                "this refiner is dt-conditioned (RefinerConfig.dt_conditioning): pass dt, the age of v (the time "
                "from where v was evaluated to t; flowturbo.integrator computes it per call)"
            )
        if not self.takes_dt and dt is not None:
            raise FlowTurboError(
                "this refiner has no dt input (RefinerConfig.dt_conditioning is false, e.g. an official FlowTurbo "
                "refiner): call it without dt, or load a dt-conditioned refiner"
            )
        out = self._run(torch.cat([x, v], dim=1), t, y, force_drop_ids, dt)  # (N, out, H, W)
        return out[:, :channels]


def refiner_takes_dt(refiner: object) -> bool:
    """Whether a refiner (a :class:`VelocityRefiner` or any callable with a ``takes_dt`` attribute) takes the
    velocity age ``dt`` as its fifth argument; plain callables without the attribute do not."""
    return bool(getattr(refiner, "takes_dt", False))


# ------------------------------------------------------------------------------------------- helpers
def count_parameters(module: nn.Module) -> int:
    """All parameters, trainable or not (as the official "675M" count of SiT-XL/2)."""
    return sum(p.numel() for p in module.parameters())


def format_parameter_count(count: int) -> str:
    """``675129632`` -> ``"675.1M"``."""
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}K"
    return str(count)


@torch.no_grad()
def perturb_zero_initialized(
    model: _AdaLNTransformer, *, std: float = RANDOM_ZERO_INIT_STD, generator: torch.Generator | None = None
) -> None:
    """Add N(0, std) noise to the adaLN-Zero layers so a freshly initialised model has non-zero outputs.

    For tests and demo bundles only; a trained model never needs it. ``generator`` must be a CPU generator.
    """
    for layer in model.zero_initialized_layers():
        for param in (layer.weight, layer.bias):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.add_(noise.to(device=param.device, dtype=param.dtype))


__all__ = [
    "ADALN_EPS",
    "Attention",
    "FinalLayer",
    "HEADS_BY_HIDDEN_SIZE",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "PendingResidual",
    "RefinerConfig",
    "SIT_ARCHS",
    "SIT_PATCH_SIZES",
    "SIT_PRESETS",
    "SMALL_SIT_ARCHS",
    "SMALL_SIT_PATCH_SIZES",
    "SiT",
    "SiTBlock",
    "SiTConfig",
    "TimestepEmbedder",
    "VelocityRefiner",
    "apply_pending",
    "count_parameters",
    "format_parameter_count",
    "perturb_zero_initialized",
    "refiner_takes_dt",
    "sincos_pos_embed_2d",
    "sit_config",
    "timestep_embedding",
]
