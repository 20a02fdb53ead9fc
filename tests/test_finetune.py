"""Fine-tuning as the transfer-learning tutorial does it: images resized on the device for the
network, the head trained alone first, ImageNet's normalisation for ImageNet weights."""

from __future__ import annotations

import pytest
import torch

from conftest import CALIBRATION, make_competition, train_and_predict_from_random_timm_weights
from kaggle_cifar import distributed, train
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import train_folds
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.model import IMAGENET_MEAN, IMAGENET_STD, for_config, training_flops_per_image

CFG = TrainConfig(folds=2, epochs=3, width=4, batch_size=4, lr=0.05, freeze_epochs=1)  # 2 steps an epoch


def test_image_size_resizes_every_batch_inside_the_model():
    seen = {}
    model = for_config(TrainConfig(width=4, image_size=48), 3).eval()
    model.network.register_forward_pre_hook(lambda _, args: seen.update(shape=tuple(args[0].shape)))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model(images).shape == (2, 3)
    assert seen["shape"] == (2, 3, 48, 48)
    native = for_config(TrainConfig(width=4), 3)
    ratio = training_flops_per_image(for_config(TrainConfig(width=4, image_size=64), 3), (3, 32, 32)) \
        / training_flops_per_image(native, (3, 32, 32))
    assert 3.5 < ratio < 4.5  # 4x the pixels, 4x the convolutions


def test_normalization_follows_the_weights_it_serves():
    data_mean, data_std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])

    def stats(**kw):
        layer = for_config(TrainConfig(width=4, **kw), 3, data_mean, data_std).input
        return layer.mean.flatten().tolist(), layer.std.flatten().tolist()

    imagenet = (pytest.approx(IMAGENET_MEAN), pytest.approx(IMAGENET_STD))
    assert stats() == (data_mean.tolist(), data_std.tolist())
    assert stats(pretrained="w.pth") == imagenet
    assert stats(pretrained="w.pth", normalization="data") == (data_mean.tolist(), data_std.tolist())
    assert stats(normalization="imagenet") == imagenet
    with pytest.raises(ConfigError, match="normalization must be one of auto, data, imagenet"):
        TrainConfig(normalization="cifar")
    with pytest.raises(ConfigError, match=r"freeze_epochs must be fewer than --epochs \(3\)"):
        TrainConfig(epochs=3, freeze_epochs=3)
    with pytest.raises(ConfigError, match=r"^invalid config: epochs must be at least 1$"):  # no freeze phase to blame
        TrainConfig(epochs=0)


def test_frozen_epochs_train_only_the_head_and_a_resume_lands_in_the_right_phase(tmp_path, monkeypatch):
    small = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cpu = distributed.setup("cpu")
    train_folds(CFG, small, tmp_path / "straight", small / ".cache", cpu)

    calls, real_augment = {"n": 0}, train.augment

    def crash_at_the_start_of_epoch_2(*args):
        calls["n"] += 1
        if calls["n"] == CALIBRATION + 2 + 1:
            raise KeyboardInterrupt("simulated kill")
        return real_augment(*args)

    monkeypatch.setattr(train, "augment", crash_at_the_start_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_folds(CFG, small, tmp_path / "resumed", small / ".cache", cpu)
    after_frozen_epoch = torch.load(tmp_path / "resumed" / "fold0" / "last.pt", weights_only=True)["model"]
    initial = train.initial_model(CFG, 3, 0).state_dict()  # the network's; "0.*" is the input layer's mean and std
    changed = {name for name in initial if name.startswith("1.") and not torch.equal(initial[name], after_frozen_epoch[name])}
    assert changed == {"1.head.2.weight", "1.head.2.bias"}  # BatchNorm statistics included: all else as it was

    monkeypatch.setattr(train, "augment", real_augment)
    train_folds(CFG, small, tmp_path / "resumed", small / ".cache", cpu)
    for fold in (0, 1):
        straight = torch.load(tmp_path / "straight" / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        resumed = torch.load(tmp_path / "resumed" / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(resumed["1.stem.0.weight"], initial["1.stem.0.weight"])  # then everything trained


def test_a_timm_imagenet_checkpoint_fine_tunes_at_another_size_and_predicts(tmp_path):
    _, run, _ = train_and_predict_from_random_timm_weights(tmp_path, "resnet18", "--arch", "resnet18", "--epochs", "2",
                                                           "--freeze-epochs", "1", "--image-size", "64")
    trained = torch.load(run / "fold0" / "model.pt", weights_only=True)["model"]
    torch.testing.assert_close(trained["0.mean"].flatten(), torch.tensor(IMAGENET_MEAN))
