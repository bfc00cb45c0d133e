"""SiT / refiner models against an independent float64 re-derivation of the official SiT equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

import flowturbo.training.models as models
from flowturbo.errors import FlowTurboError
from flowturbo.kernels import KernelBackend
from flowturbo.training.models import (
    SIT_PRESETS,
    RefinerConfig,
    SiT,
    SiTConfig,
    VelocityRefiner,
    count_parameters,
    perturb_zero_initialized,
    sincos_pos_embed_2d,
    sit_config,
)

# An odd, non-preset config: 3 channels, 6x6 latents, patch 2 (3x3 tokens), 3 heads of 16, 7 classes.
ODD = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=48, depth=3, num_heads=3, num_classes=7)


def _random_model(cls, config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = cls(config)
    model.initialize_weights(gen)
    perturb_zero_initialized(model, std=0.05, generator=gen)
    return model.eval()


def _inputs(config, n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.rand(n, generator=gen)
    y = torch.randint(0, config.num_classes + 1, (n,), generator=gen)  # includes the null id
    return x, t, y


# ------------------------------------------------------------------------ independent float64 oracle
def _linear(h, sd, name):
    return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _modulate_ln(h, shift, scale):
    return F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _timestep_mlp(sd, prefix, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return _linear(F.silu(_linear(t_freq, sd, f"{prefix}.mlp.0")), sd, f"{prefix}.mlp.2")


def reference_forward(sd, x, t, y, *, num_heads, patch, out_channels, dt=None):
    """Official SiT forward (DiT equations) written out with plain tensor ops in float64 (``dt``: a dt-conditioned
    refiner's velocity age, embedded by ``dt_embedder`` like t and added to the conditioning)."""
    sd = {k: v.double() for k, v in sd.items()}
    x, t = x.double(), t.double()
    n, c, height, _ = x.shape
    p, g = patch, height // patch
    d = sd["pos_embed"].shape[-1]
    patches = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(d, -1).T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    cond = _timestep_mlp(sd, "t_embedder", t) + sd["y_embedder.embedding_table.weight"][y]
    if dt is not None:
        cond = cond + _timestep_mlp(sd, "dt_embedder", dt)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    dh = d // num_heads
    for i in range(depth):
        b = f"blocks.{i}"
        s1, c1, g1, s2, c2, g2 = _linear(F.silu(cond), sd, f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        h = _modulate_ln(tokens, s1, c1)
        q, k, v = _linear(h, sd, f"{b}.attn.qkv").reshape(n, g * g, 3, num_heads, dh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v  # (N, H, T, Dh)
        tokens = tokens + g1[:, None] * _linear(att.transpose(1, 2).reshape(n, g * g, d), sd, f"{b}.attn.proj")
        h = _modulate_ln(tokens, s2, c2)
        mlp = _linear(F.gelu(_linear(h, sd, f"{b}.mlp.fc1"), approximate="tanh"), sd, f"{b}.mlp.fc2")
        tokens = tokens + g2[:, None] * mlp
    shift, scale = _linear(F.silu(cond), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = _linear(_modulate_ln(tokens, shift, scale), sd, "final_layer.linear")
    out = out.reshape(n, g, g, p, p, out_channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, out_channels, g * p, g * p)


def _numpy_pos_embed(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed, as the official code computes it (numpy)."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], axis=1)


# ------------------------------------------------------------------------------------------ configs
def test_presets_cover_published_and_small_sizes():
    assert {"SiT-XL/2", "SiT-XL/8", "SiT-L/4", "SiT-B/2", "SiT-S/8", "SiT-T/1", "SiT-M/4"} <= set(SIT_PRESETS)
    assert len(SIT_PRESETS) == 4 * 3 + 3 * 3
    cfg = sit_config("SiT-XL/2")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (1152, 28, 16, 2)
    assert cfg.out_channels == 8 and cfg.num_tokens == 256 and cfg.preset_name == "SiT-XL/2"
    small = sit_config("SiT-M/4", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    assert (small.hidden_size, small.depth, small.num_heads) == (256, 8, 4)
    assert small.out_channels == 1 and small.num_tokens == 4 and small.null_class == 10


def test_unknown_preset_lists_valid_names():
    with pytest.raises(FlowTurboError, match="SiT-XL/2") as info:
        sit_config("SiT-XL/3")
    assert "SiT-T/1" in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(input_size=7), "multiple of patch_size"),
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(FlowTurboError, match=message):
        SiTConfig(**{**ODD.to_dict(), **changes})


def test_config_dict_round_trip_and_unknown_keys():
    assert SiTConfig.from_dict(ODD.to_dict()) == ODD
    refiner = RefinerConfig.for_predictor(ODD)
    assert RefinerConfig.from_dict(refiner.to_dict()) == refiner
    with pytest.raises(FlowTurboError, match="hidden"):
        SiTConfig.from_dict({**ODD.to_dict(), "hidden": 3})
    with pytest.raises(FlowTurboError, match="depth"):
        SiTConfig.from_dict({k: v for k, v in ODD.to_dict().items() if k != "depth"})


def test_refiner_config_for_predictor():
    cfg = RefinerConfig.for_predictor(sit_config("SiT-XL/2"))
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.patch_size) == (1152, 16, 1, 2)
    assert cfg.embed_channels == 8 and cfg.out_channels == 8 and cfg.learn_sigma


# ------------------------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("dim, grid", [(48, 3), (1152, 16)])
def test_pos_embed_matches_official_numpy_formula(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    expected = torch.from_numpy(_numpy_pos_embed(dim, grid)).float()
    torch.testing.assert_close(ours, expected, **tol(torch.float32))


def test_model_pos_embed_is_fixed_parameter_in_state_dict():
    model = SiT(ODD)
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(48, 3), **tol(torch.float32))


# ---------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    "config",
    [
        ODD,
        SiTConfig(input_size=5, patch_size=1, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                  num_classes=3, learn_sigma=False),
        SiTConfig(input_size=8, patch_size=4, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                  num_classes=5, class_dropout_prob=0.0, mlp_ratio=2.5),
    ],
)
def test_sit_forward_matches_reference(config, seeded):
    model = _random_model(SiT, config)
    x, t, y = _inputs(config)
    if not config.has_null_class:
        y = y.clamp(max=config.num_classes - 1)
    with torch.no_grad():
        out = model(x, t, y)
    expected = reference_forward(
        model.state_dict(), x, t, y, num_heads=config.num_heads, patch=config.patch_size,
        out_channels=config.out_channels,
    )
    assert out.shape == (5, config.out_channels, config.input_size, config.input_size)
    assert out.abs().mean() > 1e-3  # non-trivial outputs
    torch.testing.assert_close(out.double(), expected, **tol("model_fp32"))
    torch.testing.assert_close(model.velocity(x, t, y), out[:, : config.in_channels], **tol(torch.float32))


def test_refiner_forward_matches_reference():
    config = RefinerConfig.for_predictor(ODD)
    refiner = _random_model(VelocityRefiner, config)
    x, t, y = _inputs(ODD)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        offset = refiner(x, t, y, v)
    full = reference_forward(
        refiner.state_dict(), torch.cat([x, v], dim=1), t, y, num_heads=3, patch=2, out_channels=config.out_channels
    )
    assert offset.shape == x.shape
    torch.testing.assert_close(offset.double(), full[:, : ODD.in_channels], **tol("model_fp32"))
    assert refiner.state_dict()["x_embedder.proj.weight"].shape == (48, 6, 2, 2)
    assert len(refiner.blocks) == 1


def test_dt_refiner_forward_matches_reference():
    """c = t_emb + y_emb + dt_emb with a dt_embedder of t_embedder's kind (keys dt_embedder.mlp.{0,2})."""
    config = RefinerConfig.for_predictor(ODD, dt_conditioning=True)
    refiner = _random_model(VelocityRefiner, config)  # perturbed: the dt path is live
    assert refiner.takes_dt and _random_model(VelocityRefiner, RefinerConfig.for_predictor(ODD)).takes_dt is False
    x, t, y = _inputs(ODD)
    gen = torch.Generator().manual_seed(3)
    v, dt = torch.randn(x.shape, generator=gen), torch.rand(5, generator=gen) * 0.5
    with torch.no_grad():
        offset = refiner(x, t, y, v, dt)
        other = refiner(x, t, y, v, dt + 0.25)
    full = reference_forward(refiner.state_dict(), torch.cat([x, v], dim=1), t, y, num_heads=3, patch=2,
                             out_channels=config.out_channels, dt=dt)
    torch.testing.assert_close(offset.double(), full[:, : ODD.in_channels], **tol("model_fp32"))
    assert (offset - other).abs().max() > 10 * tol(torch.float32)["atol"]  # dt matters
    assert {k for k in refiner.state_dict() if k.startswith("dt_embedder.")} == {
        "dt_embedder.mlp.0.weight", "dt_embedder.mlp.0.bias", "dt_embedder.mlp.2.weight", "dt_embedder.mlp.2.bias"}


def test_fresh_dt_refiner_equals_the_same_refiner_without_dt():
    """The dt embedding's output layer starts at zero: a dt refiner given a trained refiner's weights computes exactly
    what that refiner computes, for any dt (so training can start from it)."""
    plain = _random_model(VelocityRefiner, RefinerConfig.for_predictor(ODD))
    fresh = VelocityRefiner(RefinerConfig.for_predictor(ODD, dt_conditioning=True)).eval()
    output_layer = fresh.dt_embedder.mlp[2]
    assert torch.count_nonzero(output_layer.weight) == 0 and torch.count_nonzero(output_layer.bias) == 0
    assert torch.count_nonzero(fresh.dt_embedder.mlp[0].weight) > 0  # its first layer is initialised like t's
    fresh.load_state_dict({**fresh.state_dict(), **plain.state_dict()})
    x, t, y = _inputs(ODD)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = plain(x, t, y, v)
        for dt in (torch.zeros(5), torch.full((5,), 0.3), torch.rand(5, generator=torch.Generator().manual_seed(5))):
            assert torch.equal(fresh(x, t, y, v, dt), want)
    assert want.abs().mean() > 1e-3


def test_dt_input_is_strict_both_ways():
    x, t, y = _inputs(ODD)
    dt_refiner = _random_model(VelocityRefiner, RefinerConfig.for_predictor(ODD, dt_conditioning=True))
    with pytest.raises(FlowTurboError, match="dt-conditioned .* pass dt"):
        dt_refiner(x, t, y, x)
    official = _random_model(VelocityRefiner, RefinerConfig.for_predictor(ODD))
    with pytest.raises(FlowTurboError, match="has no dt input"):
        official(x, t, y, x, torch.zeros(5))
    assert models.refiner_takes_dt(dt_refiner) and not models.refiner_takes_dt(official)
    assert not models.refiner_takes_dt(lambda x, t, y, v: v)  # plain callables: the released call


def test_refiner_config_dt_conditioning_round_trip():
    cfg = RefinerConfig.for_predictor(ODD, dt_conditioning=True)
    assert cfg.to_dict()["dt_conditioning"] is True and RefinerConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in RefinerConfig.for_predictor(ODD).to_dict().items() if k != "dt_conditioning"}
    assert RefinerConfig.from_dict(old).dt_conditioning is False  # configs written before the field
    assert "dt-conditioned" in cfg.describe()
    with pytest.raises(FlowTurboError, match="dt_conditioning must be true or false"):
        RefinerConfig.from_dict({**old, "dt_conditioning": "yes"})


def test_block_standalone_equals_chained():
    model = _random_model(SiT, ODD)
    tokens = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(5))
    c = torch.randn(2, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        two = model.blocks[1](model.blocks[0](tokens, c), c)
        x, pending = model.blocks[0].forward_chained(tokens, c, None)
        x, pending = model.blocks[1].forward_chained(x, c, pending)
        chained = models.apply_pending(x, pending)
    torch.testing.assert_close(chained, two, **tol(torch.float32))


def test_fresh_model_outputs_zero_and_scalar_t():
    model = SiT(ODD).eval()  # adaLN-Zero init: output layer is zero
    x, t, y = _inputs(ODD)
    assert torch.count_nonzero(model(x, t, y)) == 0
    trained = _random_model(SiT, ODD)
    with torch.no_grad():
        torch.testing.assert_close(
            trained(x, torch.tensor(0.3), y), trained(x, torch.full((5,), 0.3), y), **tol(torch.float32)
        )


def test_force_drop_ids_uses_null_label():
    model = _random_model(SiT, ODD)
    x, t, y = _inputs(ODD)
    y = y.clamp(max=ODD.num_classes - 1)
    drop = torch.tensor([1, 0, 1, 0, 0])
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=drop)
        manual = model(x, t, torch.where(drop == 1, ODD.num_classes, y))
        plain = model(x, t, y)
    torch.testing.assert_close(dropped, manual, **tol(torch.float32))
    assert not torch.allclose(dropped[0], plain[0])
    assert torch.equal(dropped[1], plain[1])


def test_forward_is_deterministic_in_train_mode():
    """No hidden label dropout: train() and eval() give the same output."""
    model = _random_model(SiT, ODD)
    x, t, y = _inputs(ODD)
    with torch.no_grad():
        assert torch.equal(model.train()(x, t, y), model.eval()(x, t, y))


def test_wrong_input_shape_is_refused():
    model = SiT(ODD)
    x, t, y = _inputs(ODD)
    with pytest.raises(FlowTurboError, match=r"\(N, 3, 6, 6\)"):
        model(x[:, :, :4, :4], t, y)
    refiner = VelocityRefiner(RefinerConfig.for_predictor(ODD))
    with pytest.raises(FlowTurboError, match="v of shape"):
        refiner(x, t, y, x[:, :2])


def test_backward_reaches_trainable_parameters_only():
    model = _random_model(SiT, ODD).train()
    x, t, y = _inputs(ODD)
    model(x, t, y).square().mean().backward()
    assert model.pos_embed.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0


def test_initialize_weights_is_deterministic_with_generator():
    a, b, c = _random_model(SiT, ODD, seed=4), _random_model(SiT, ODD, seed=4), _random_model(SiT, ODD, seed=5)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------- kernel backend
def test_kernel_backend_is_an_explicit_argument(monkeypatch):
    seen = []
    real = models.gated_residual_layernorm_modulate

    def spy(*args, backend, **kwargs):
        seen.append(backend)
        return real(*args, backend=KernelBackend.REFERENCE, **kwargs)

    monkeypatch.setattr(models, "gated_residual_layernorm_modulate", spy)
    real_ln = models.layernorm_modulate
    first_norm = []

    def spy_ln(*args, backend, **kwargs):  # block 0's norm1 (no residual before it); keeps CUDA machines on CPU
        first_norm.append(backend)
        return real_ln(*args, backend=KernelBackend.REFERENCE, **kwargs)

    monkeypatch.setattr(models, "layernorm_modulate", spy_ln)
    model = SiT(ODD, kernel_backend="reference")
    assert model.kernel_backend is KernelBackend.REFERENCE
    x, t, y = _inputs(ODD)
    model(x, t, y)
    # depth 3: attention half of each block, MLP residual into blocks 1, 2 and into the final layer.
    assert seen == [KernelBackend.REFERENCE] * 6
    seen.clear()
    assert model.set_kernel_backend("triton") is model
    model(x, t, y)
    assert seen == [KernelBackend.TRITON] * 6
    assert first_norm == [KernelBackend.REFERENCE, KernelBackend.TRITON]
    with pytest.raises(FlowTurboError, match="unknown kernel backend"):
        SiT(ODD, kernel_backend="cuda-magic")


def test_meta_device_construction_and_counts():
    with torch.device("meta"):
        model = SiT(sit_config("SiT-B/2"))
    assert model.pos_embed.is_meta
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert models.format_parameter_count(675_129_632) == "675.1M"


def test_triton_backend_matches_reference_backend():
    """The fused adaLN kernels (Triton interpreter on CPU, real kernels on CUDA) plug into the model."""
    model = _random_model(SiT, ODD)
    x, t, y = _inputs(ODD, n=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x, t, y = model.to(device), x.to(device), t.to(device), y.to(device)
    with torch.no_grad():
        reference = model(x, t, y)
        fused = model.set_kernel_backend("triton")(x, t, y)
    torch.testing.assert_close(fused, reference, **tol("model_fp32"))
