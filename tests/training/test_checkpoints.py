"""Checkpoint reading, architecture inference and strict loading (no real checkpoint files needed)."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from flowturbo.errors import CheckpointError
from flowturbo.training.checkpoints import (
    extract_state_dict,
    infer_refiner_config,
    infer_sit_config,
    load_checkpoint_file,
    load_refiner_checkpoint,
    load_sit_checkpoint,
    strict_load,
)
from flowturbo.training.models import (
    RefinerConfig,
    SiT,
    SiTConfig,
    VelocityRefiner,
    count_parameters,
    perturb_zero_initialized,
    sit_config,
)

TINY = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=7)


def official_key_shapes(*, hidden, depth, in_channels, patch, tokens, num_classes, out_channels, mlp_hidden):
    """The official SiT/DiT state dict (willisma/SiT models.py + timm PatchEmbed/Attention/Mlp), by hand."""
    d = hidden
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_channels, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (patch * patch * out_channels, d),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (mlp_hidden, d),
            f"blocks.{i}.mlp.fc1.bias": (mlp_hidden,),
            f"blocks.{i}.mlp.fc2.weight": (d, mlp_hidden),
            f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _random(cls, config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = cls(config)
    model.initialize_weights(gen)
    perturb_zero_initialized(model, std=0.05, generator=gen)
    return model.eval()


def _inputs(config, n=3):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    return x, torch.rand(n, generator=gen), torch.randint(0, config.num_classes, (n,), generator=gen)


@pytest.fixture(scope="module")
def xl_meta():
    with torch.device("meta"):
        return SiT(sit_config("SiT-XL/2"))


# ------------------------------------------------------------------------------ official layout
def test_sit_xl2_key_table_and_parameter_count(xl_meta):
    expected = official_key_shapes(
        hidden=1152, depth=28, in_channels=4, patch=2, tokens=256, num_classes=1000, out_channels=8, mlp_hidden=4608
    )
    assert _shapes(xl_meta) == expected
    assert expected["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert expected["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert expected["final_layer.linear.weight"] == (32, 1152)
    assert expected["pos_embed"] == (1, 256, 1152)
    assert len(xl_meta.blocks) == 28
    assert abs(count_parameters(xl_meta) - 675.1e6) <= 0.1e6  # official SiT-XL/2: 675M


def test_flowturbo_refiner_key_table():
    """FlowTurbo's released refiner: VelocityPredictor(depth=1, in_channels_scale=2), learn_sigma=True."""
    with torch.device("meta"):
        refiner = VelocityRefiner(RefinerConfig.for_predictor(sit_config("SiT-XL/2")))
    expected = official_key_shapes(
        hidden=1152, depth=1, in_channels=8, patch=2, tokens=256, num_classes=1000, out_channels=8, mlp_hidden=4608
    )
    assert _shapes(refiner) == expected
    ratio = count_parameters(refiner) / 675.1e6
    assert 0.04 < ratio < 0.05  # "about 4% of the predictor"


def test_hand_written_official_state_dict_loads_strictly():
    shapes = official_key_shapes(
        hidden=48, depth=2, in_channels=3, patch=2, tokens=9, num_classes=7, out_channels=6, mlp_hidden=192
    )
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    model = load_sit_checkpoint(state, num_heads=3)
    assert model.config == TINY
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("name", ["SiT-XL/2", "SiT-L/4", "SiT-B/8", "SiT-S/2", "SiT-T/1", "SiT-M/4"])
def test_infer_sit_config_for_presets(name):
    config = sit_config(name, input_size=16 if name.endswith("/1") else 32)
    with torch.device("meta"):
        state = SiT(config).state_dict()
    assert infer_sit_config(state) == config


def test_infer_refiner_and_learn_sigma_false():
    config = SiTConfig(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3, learn_sigma=False, mlp_ratio=2.0)
    with torch.device("meta"):
        state = SiT(config).state_dict()
        refiner_cfg = RefinerConfig.for_predictor(config)
        refiner_state = VelocityRefiner(refiner_cfg).state_dict()
    assert infer_sit_config(state, num_heads=2) == config
    assert infer_refiner_config(refiner_state, num_heads=2) == refiner_cfg


def test_infer_needs_heads_for_unknown_width():
    with torch.device("meta"):
        state = SiT(TINY).state_dict()
    with pytest.raises(CheckpointError, match="num_heads"):
        infer_sit_config(state)
    assert infer_sit_config(state, num_heads=3) == TINY


def test_infer_rejects_foreign_keys():
    with pytest.raises(CheckpointError, match="x_embedder.proj.weight"):
        infer_sit_config({"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)})


# ------------------------------------------------------------------------------------ file formats
@pytest.mark.parametrize("layout", ["raw", "model", "ema", "ema+model", "ddp", "compiled"])
def test_load_layouts_give_identical_outputs(tmp_path, layout):
    source = _random(SiT, TINY)
    other = _random(SiT, TINY, seed=9)
    state = source.state_dict()
    payload = {
        "raw": state,
        "model": {"model": state, "args": argparse.Namespace(lr=1e-4)},
        "ema": {"ema": state},
        "ema+model": {"model": other.state_dict(), "ema": state, "opt": {}, "args": argparse.Namespace(x=1)},
        "ddp": {"model": {f"module.{k}": v for k, v in state.items()}},
        "compiled": {f"_orig_mod.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = load_sit_checkpoint(path, num_heads=3)
    x, t, y = _inputs(TINY)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), source(x, t, y))
    assert not loaded.training


def test_prefer_model_over_ema(tmp_path):
    ema, raw = _random(SiT, TINY, seed=1), _random(SiT, TINY, seed=2)
    checkpoint = {"model": raw.state_dict(), "ema": ema.state_dict()}
    chosen = extract_state_dict(checkpoint, prefer="model")
    assert torch.equal(chosen["blocks.0.attn.qkv.weight"], raw.blocks[0].attn.qkv.weight)
    chosen = extract_state_dict(checkpoint)
    assert torch.equal(chosen["blocks.0.attn.qkv.weight"], ema.blocks[0].attn.qkv.weight)


def test_safetensors_and_dtype_and_refiner(tmp_path):
    refiner = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY))
    path = tmp_path / "refiner.safetensors"
    save_file({k: v.contiguous() for k, v in refiner.state_dict().items()}, str(path))
    loaded = load_refiner_checkpoint(path, num_heads=3)
    x, t, y = _inputs(TINY)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, v), refiner(x, t, y, v))
    half = load_refiner_checkpoint(path, num_heads=3, dtype=torch.float64)
    assert half.blocks[0].attn.qkv.weight.dtype == torch.float64
    assert not half.pos_embed.requires_grad


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_checkpoint_file(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_sit_checkpoint(garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint_file(bad_st)
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint_file(tmp_path)


class _Custom:
    """Not allow-listed: the safe loader must refuse it."""


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": {"a": torch.ones(2)}, "extra": _Custom()}, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint_file(path)
    assert torch.equal(load_checkpoint_file(path, trust_pickle=True)["model"]["a"], torch.ones(2))


def test_extract_state_dict_rejects_non_state_dicts():
    with pytest.raises(CheckpointError, match="not a state dict"):
        extract_state_dict([torch.ones(1)])
    with pytest.raises(CheckpointError, match="'step'"):
        extract_state_dict({"weight": torch.ones(1), "step": 3})


# ----------------------------------------------------------------------------------- strict errors
def _expect_refusal(state, *needles):
    with pytest.raises(CheckpointError) as info:
        load_sit_checkpoint(state, TINY)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    assert "custom SiT (hidden 48, depth 2, heads 3" in message and "parameters" in message


def test_missing_key_is_named():
    state = _random(SiT, TINY).state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    _expect_refusal(state, "1 missing keys: blocks.1.mlp.fc2.bias")


def test_unexpected_key_is_named():
    state = _random(SiT, TINY).state_dict()
    state["blocks.2.attn.qkv.weight"] = torch.zeros(144, 48)
    _expect_refusal(state, "1 unexpected keys: blocks.2.attn.qkv.weight")


def test_shape_mismatch_names_both_shapes():
    state = _random(SiT, TINY).state_dict()
    state["y_embedder.embedding_table.weight"] = torch.zeros(11, 48)
    _expect_refusal(state, "y_embedder.embedding_table.weight: checkpoint (11, 48) vs model (8, 48)")


def test_error_lists_first_five_and_counts_the_rest():
    state = {k: v for k, v in _random(SiT, TINY).state_dict().items() if not k.startswith("blocks.")}
    _expect_refusal(state, "20 missing keys:", "(15 more)")


def test_predictor_checkpoint_into_refiner_is_refused():
    state = _random(SiT, TINY).state_dict()
    expected = r"x_embedder.proj.weight: checkpoint \(48, 3, 2, 2\) vs model \(48, 6, 2, 2\)"
    with pytest.raises(CheckpointError, match=expected):
        load_refiner_checkpoint(state, RefinerConfig.for_predictor(TINY))


def test_expected_model_description_for_xl(xl_meta):
    with pytest.raises(CheckpointError, match=r"expected SiT-XL/2 .* with 675.1M parameters"):
        strict_load(xl_meta, {"pos_embed": torch.zeros(1, 256, 1152)})


def test_refiner_must_fit_the_given_predictor():
    refiner = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY))
    state = refiner.state_dict()
    loaded = load_refiner_checkpoint(state, predictor_config=TINY)  # heads taken from the predictor
    assert loaded.config == RefinerConfig.for_predictor(TINY)
    other = SiTConfig(input_size=6, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3, num_classes=9)
    with pytest.raises(CheckpointError, match="num_classes = 7 but the predictor"):
        load_refiner_checkpoint(state, predictor_config=other)


# ------------------------------------------------------------------------------------- dt conditioning
def test_dt_conditioning_is_inferred_from_the_keys(tmp_path):
    dt_refiner = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY, dt_conditioning=True))
    official = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY))
    assert infer_refiner_config(dt_refiner.state_dict(), num_heads=3).dt_conditioning is True
    assert infer_refiner_config(official.state_dict(), num_heads=3).dt_conditioning is False
    path = tmp_path / "dt_refiner.pt"
    torch.save({"model": dt_refiner.state_dict(), "ema": official.state_dict()}, path)  # the released layout
    loaded = load_refiner_checkpoint(path, predictor_config=TINY)  # "model" entry, config from the keys
    x, t, y = _inputs(TINY)
    dt = torch.full((3,), 0.2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, x, dt), dt_refiner(x, t, y, x, dt))


def test_dt_conditioning_mismatch_names_the_fix():
    dt_state = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY, dt_conditioning=True)).state_dict()
    official_state = _random(VelocityRefiner, RefinerConfig.for_predictor(TINY)).state_dict()
    with pytest.raises(CheckpointError, match='is dt-conditioned .* "dt_conditioning": true'):
        load_refiner_checkpoint(dt_state, RefinerConfig.for_predictor(TINY))  # dt weights, a no-dt config
    with pytest.raises(CheckpointError, match='has no dt embedding .* "dt_conditioning": false'):
        load_refiner_checkpoint(official_state, RefinerConfig.for_predictor(TINY, dt_conditioning=True))
