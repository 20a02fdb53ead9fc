import torch

import math

import pytest
from torchvision.transforms.v2 import functional as F

from kaggle_cifar.augment import (AUTO_AUGMENT_OPS, AUTO_AUGMENT_POLICIES, TTA_VIEWS, apply_ops, auto_augment, cutout,
                                  flip_crop, translate, tta_view)


def random_images(n=64, h=8, w=8):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fill, mode", [("zeros", "constant"), ("reflect", "reflect")])
def test_flip_crop_output_is_a_flipped_or_not_crop_of_the_image_padded_by_its_fill(fill, mode):
    images, pad = random_images(), 2
    out = flip_crop(images, pad, torch.Generator().manual_seed(1), fill=fill)
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips, shifts = 0, set()
    for src, dst in zip(images, out):
        padded = [torch.nn.functional.pad(s[None], (pad,) * 4, mode=mode)[0] for s in (src, src.flip(2))]
        matches = [(f, dy, dx) for f in (False, True) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(padded[f][:, dy:dy + 8, dx:dx + 8], dst)]
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
def test_auto_augment_draws_per_image_from_its_generator(policy):
    same = random_images(1, 16, 16).expand(64, -1, -1, -1)  # one image, many times
    global_rng = torch.get_rng_state()
    out = auto_augment(same, policy, torch.Generator().manual_seed(0))
    assert out.shape == same.shape and out.dtype == torch.uint8
    assert torch.equal(torch.get_rng_state(), global_rng)  # only the given generator is drawn from
    assert len({image.numpy().tobytes() for image in out}) > 20  # ops and strengths vary per image
    assert torch.equal(auto_augment(same, policy, torch.Generator().manual_seed(0)), out)  # replayable
    generator = torch.Generator().manual_seed(0)
    auto_augment(same, policy, generator)
    assert not torch.equal(auto_augment(same, policy, generator), out)  # the generator moves on


def ops_at(images, name, strength, policy="randaugment"):
    n = len(images)
    return apply_ops(images, torch.full((n,), AUTO_AUGMENT_OPS.index(name)), torch.full((n,), strength),
                     AUTO_AUGMENT_POLICIES[policy])


@pytest.mark.parametrize("name, strength, torchvision_op", [
    ("identity", 0.5, lambda x: x),
    ("brightness", 0.5, lambda x: F.adjust_brightness(x, 1 + 0.9 * 0.5)),
    ("brightness", -0.5, lambda x: F.adjust_brightness(x, 1 - 0.9 * 0.5)),
    ("color", 0.7, lambda x: F.adjust_saturation(x, 1 + 0.9 * 0.7)),
    ("contrast", -0.3, lambda x: F.adjust_contrast(x, 1 - 0.9 * 0.3)),
    ("sharpness", 0.9, lambda x: F.adjust_sharpness(x, 1 + 0.9 * 0.9)),
    ("posterize", 0.5, lambda x: F.posterize(x, 6)),  # 8 - round(4 * 0.5) bits kept
    ("solarize", -0.4, lambda x: F.solarize(x, 255 * 0.6)),
    ("autocontrast", 1.0, F.autocontrast),
    ("equalize", 1.0, F.equalize),
    ("translate_x", 4 * 331 / (150 * 16), lambda x: F.affine(x, 0.0, [-4, 0], 1.0, [0.0, 0.0])),
    ("translate_y", -3 * 331 / (150 * 16), lambda x: F.affine(x, 0.0, [0, 3], 1.0, [0.0, 0.0])),
])
def test_each_op_is_torchvisions(name, strength, torchvision_op):
    images = random_images(8, 16, 16)
    images[:, :, :4] //= 2  # some structure for equalize and autocontrast to act on
    ours, theirs = ops_at(images, name, strength), torchvision_op(images)
    assert (ours.int() - theirs.int()).abs().max() <= 1  # float rounding before the uint8 cast


@pytest.mark.parametrize("name, strength, angle, shear", [
    ("rotate", 0.5, 15.0, [0.0, 0.0]), ("rotate", -1.0, -30.0, [0.0, 0.0]),
    ("shear_x", 0.5, 0.0, [math.degrees(math.atan(0.15)), 0.0]), ("shear_y", 1.0, 0.0, [0.0, math.degrees(math.atan(0.3))]),
])
def test_rotate_and_shear_match_torchvision_but_for_rounding_at_pixel_edges(name, strength, angle, shear):
    images = random_images(8, 16, 16)
    ours, theirs = ops_at(images, name, strength), F.affine(images, -angle, [0, 0], 1.0, shear)
    assert (ours == theirs).float().mean() > 0.99
    assert not torch.equal(ours, images)


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


def test_alternating_flips_show_every_image_both_ways_in_any_two_epochs_in_a_row(tmp_path, monkeypatch):
    from conftest import CALIBRATION, make_competition
    from kaggle_cifar import train
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.cv import train_folds
    from kaggle_cifar.distributed import setup

    seen = []  # (dataset rows, flipped) of every training batch, recorded where train_one_epoch augments
    real = train.augment
    monkeypatch.setattr(train, "augment", lambda images, cfg, generator, flipped=None: (
        seen.append((images.clone(), flipped)), real(images, cfg, generator, flipped))[1])
    competition = make_competition(tmp_path / "input", per_class=4, n_test=3)
    cfg = TrainConfig(folds=2, epochs=3, width=8, batch_size=64, flip="alternate", crop_pad=0)
    train_folds(cfg, competition, tmp_path / "run", competition / ".cache", setup("cpu"))
    epochs = [seen[CALIBRATION + e:CALIBRATION + e + 1] for e in range(3)]  # fold 0's epochs: one batch each
    assert all(flipped is not None for batch in epochs for _, flipped in batch)

    def sides(epoch):  # image (its bytes, before augmentation) -> flipped in this epoch
        return {image.numpy().tobytes(): bool(f) for batch in epoch for image, f in zip(*batch)}

    first, second, third = sides(epochs[0]), sides(epochs[1]), sides(epochs[2])
    assert set(first) == set(second) and all(first[k] != second[k] for k in first)
    assert first == third
    assert 0 < sum(first.values()) < len(first)


def test_augment_flips_exactly_the_images_it_is_told_to():
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.train import augment

    images = random_images(16).permute(0, 2, 3, 1)  # NHWC, as the training set holds them
    flipped = torch.arange(16) % 3 == 0
    out = augment(images, TrainConfig(flip="alternate", crop_pad=0), torch.Generator().manual_seed(0), flipped)
    for src, dst, f in zip(images.permute(0, 3, 1, 2), out, flipped):
        assert torch.equal(dst, src.flip(2) if f else src)


def test_training_crops_pad_with_the_configs_fill_and_a_config_saved_without_one_pads_with_zeros(tmp_path):
    import json

    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.train import augment

    images = random_images(16).permute(0, 2, 3, 1)  # NHWC, as the training set holds them
    (tmp_path / "config.json").write_text(json.dumps({"crop_pad": 3}))  # saved before --crop-fill existed
    for cfg, fill in ((TrainConfig(crop_pad=3, crop_fill="reflect"), "reflect"), (TrainConfig.from_json(tmp_path / "config.json"), "zeros")):
        out = augment(images, cfg, torch.Generator().manual_seed(0))
        assert torch.equal(out, flip_crop(images.permute(0, 3, 1, 2), 3, torch.Generator().manual_seed(0), fill=fill))


def test_a_config_saved_with_flips_as_yes_or_no_reads_as_random_or_none(tmp_path):
    import json

    from kaggle_cifar.config import TrainConfig

    for saved, rule in ((True, "random"), (False, "none")):
        (tmp_path / "config.json").write_text(json.dumps({"flip": saved, "epochs": 3}))
        assert TrainConfig.from_json(tmp_path / "config.json") == TrainConfig(flip=rule, epochs=3)
