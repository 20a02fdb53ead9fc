import torch

import pytest

from kaggle_cifar.augment import AUTO_AUGMENT_GROUPS, TTA_VIEWS, auto_augment, cutout, flip_crop, translate, tta_view


def random_images(n=64, h=8, w=8):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_flip_crop_output_is_a_flipped_or_not_crop_of_the_zero_padded_image():
    images, pad = random_images(), 2
    out = flip_crop(images, pad, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips, shifts = 0, set()
    for src, dst in zip(images, out):
        matches = [(f, dy, dx) for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(torch.nn.functional.pad(src.flip(2) if f else src, (pad,) * 4)[:, dy:dy + 8, dx:dx + 8], dst)]
        assert len(matches) == 1, "every output must be exactly one flip/crop of its own input"
        flips += matches[0][0]
        shifts.add(matches[0][1:])
    assert 10 < flips < 54  # about half flipped
    assert len(shifts) > 10  # offsets vary per image, not one per batch


def test_flip_crop_without_padding_only_flips():
    images = random_images()
    out = flip_crop(images, 0, torch.Generator().manual_seed(2))
    for src, dst in zip(images, out):
        assert torch.equal(dst, src) or torch.equal(dst, src.flip(2))


def test_cutout_zeroes_one_square_per_image():
    images = torch.full((16, 3, 8, 8), 7, dtype=torch.uint8)
    out = cutout(images, 4, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(1)
    assert out.dtype == torch.uint8
    assert ((out == 0) | (out == 7)).all()
    counts = zeroed.sum((1, 2))
    assert (counts > 0).all() and (counts <= 16).all() and (counts == 16).any()


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_draws_per_group_from_its_generator_alone(policy):
    group = 4
    same = random_images(1, 16, 16).expand(AUTO_AUGMENT_GROUPS * group, -1, -1, -1)  # one image, many times
    global_rng = torch.get_rng_state()
    out = auto_augment(same, policy, torch.Generator().manual_seed(0))
    assert out.shape == same.shape and out.dtype == torch.uint8
    assert torch.equal(torch.get_rng_state(), global_rng)  # the global RNG is left as it was
    groups = out.reshape(AUTO_AUGMENT_GROUPS, group, *out.shape[1:])
    assert all(torch.equal(g[0], g[i]) for g in groups for i in range(group))  # one draw per group...
    assert len({g[0].numpy().tobytes() for g in groups}) > AUTO_AUGMENT_GROUPS // 2  # ...and the draws differ
    again = auto_augment(same, policy, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)  # the same generator state gives the same batch
    generator = torch.Generator().manual_seed(0)
    auto_augment(same, policy, generator)
    assert not torch.equal(auto_augment(same, policy, generator), out)  # the generator moves on


def test_translate_moves_pixels_and_reflects_the_border():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    shifted = translate(x, 1, 1)
    assert torch.equal(shifted[..., 1:, 1:], x[..., :3, :3])
    assert torch.equal(translate(x, 0, 0), x)
    assert torch.equal(translate(translate(x, -1, -1), 1, 1)[..., 1:3, 1:3], x[..., 1:3, 1:3])


def test_tta_views():
    x = random_images(2)
    assert len(TTA_VIEWS["none"]) == 1 and len(TTA_VIEWS["flip"]) == 2 and len(TTA_VIEWS["flip_translate"]) == 6
    assert torch.equal(tta_view(x, (True, 0, 0)), x.flip(3))
    assert len({tta_view(x, v).numpy().tobytes() for v in TTA_VIEWS["flip_translate"]}) == 6  # all distinct
