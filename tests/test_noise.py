"""The one per-image noise rule (flowturbo.noise): image i of a run seeded s starts from seed s + i."""

from __future__ import annotations

import subprocess
import sys

import torch

from flowturbo.noise import SEED_MODULUS, image_seed, make_noise

SHAPE = (3, 5, 4)  # odd sizes


def test_each_image_is_its_own_seeds_draw():
    noise = make_noise(4, SHAPE, 11)
    for i in range(4):
        alone = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11 + i), dtype=torch.float32)
        assert torch.equal(noise[i], alone)
    assert not torch.equal(noise[0], noise[1])


def test_images_do_not_depend_on_the_split():
    whole = make_noise(7, SHAPE, 3)
    parts = torch.cat([make_noise(3, SHAPE, 3), make_noise(4, SHAPE, 3, first_index=3)])
    assert torch.equal(whole, parts)
    assert torch.equal(make_noise(1, SHAPE, 3, first_index=5)[0], whole[5])


def test_dtype_and_device_are_casts_of_the_float32_draw():
    a = make_noise(2, SHAPE, 7)
    b = make_noise(2, SHAPE, 7, torch.float64)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    assert torch.equal(a, b.float()) and not torch.equal(a, make_noise(2, SHAPE, 8))


def test_seeds_wrap_modulo_2_to_the_64():
    assert image_seed(SEED_MODULUS - 1, 1) == 0 and image_seed(5, 2) == 7
    wrapped = make_noise(2, SHAPE, SEED_MODULUS - 1)
    assert torch.equal(wrapped[1], make_noise(1, SHAPE, 0)[0])


def test_every_layer_uses_the_one_rule():
    from flowturbo.runtime import exported, pytorch_backend
    from flowturbo.training import sampling

    assert sampling.make_noise is make_noise
    assert exported.make_noise is make_noise
    assert pytorch_backend.make_noise is make_noise


def test_importing_the_rule_does_not_import_torch():
    code = "import sys, flowturbo.noise; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
