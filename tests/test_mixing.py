"""Mixup and CutMix (timm's, on the device batch): what a mixed batch is, which epochs mix, and
that an epoch's draws are its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_cifar import probe
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.train import Mixing

CLASSES = 10


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.arange(n) % CLASSES)


def mixed(cfg: TrainConfig, seed: int = 5):
    mixing = Mixing(cfg, CLASSES).epoch(seed, 0, 100)
    return mixing(*batch())


def shares(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each image's own label's share of its mixed label (the reversed batch's is the rest)."""
    return probabilities[torch.arange(len(targets)), targets]


def test_a_mixup_batch_blends_each_image_with_the_reversed_batchs_by_its_labels_share():
    images, targets = batch()
    out, probabilities = mixed(TrainConfig(mixup=1.0))
    assert out.dtype == torch.uint8 and out.shape == images.shape  # one input dtype: one compiled graph
    torch.testing.assert_close(probabilities.sum(1), torch.ones(8))
    lam = shares(probabilities, targets)[0].item()
    assert 0 < lam < 1 and torch.allclose(shares(probabilities, targets), torch.tensor(lam))
    expected = (lam * images.float() + (1 - lam) * images.flip(0).float()).round()
    error = (out.float() - expected).abs()
    assert error.max() <= 1 and error.mean() < 0.05  # rounded back to uint8 (float rounding aside: exactly)


def test_a_cutmix_batch_pastes_a_box_of_the_reversed_batch_whose_area_is_the_labels_share():
    images, targets = batch()
    out, probabilities = mixed(TrainConfig(cutmix=1.0))
    pasted = (out != images).any(1)  # pixels taken from the reversed batch
    assert torch.equal(out[pasted.unsqueeze(1).expand_as(out)], images.flip(0)[pasted.unsqueeze(1).expand_as(out)])
    rows, columns = pasted[0].any(1).nonzero().flatten(), pasted[0].any(0).nonzero().flatten()
    box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    assert shares(probabilities, targets)[0].item() == pytest.approx(1 - box.item() / (32 * 32), abs=0.02)


def test_smoothing_a_mixed_label_is_smoothing_each_of_its_labels():
    """The cross-entropy's label smoothing on a mixed label gives timm's smoothed mixed target."""
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    images, targets = batch()
    _, probabilities = mixed(TrainConfig(mixup=1.0))
    lam = shares(probabilities, targets)[0].item()
    logits = torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(2))
    ours = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, probabilities)
    timms = SoftTargetCrossEntropy()(logits, mixup_target(targets, CLASSES, lam, smoothing=0.1))
    torch.testing.assert_close(ours, timms)


def test_an_epochs_draws_are_its_own_whatever_else_draws_from_numpy():
    cfg = TrainConfig(mixup=1.0, cutmix=1.0)
    first = [mixed(cfg, seed) for seed in (5, 6)]
    np.random.seed(123)
    mixing = Mixing(cfg, CLASSES).epoch(5, 0, 100)
    before = np.random.get_state()[1].copy()
    again = mixing(*batch())
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator not moved
    np.random.rand(7)
    assert torch.equal(again[0], first[0][0]) and torch.equal(again[1], first[0][1])
    assert not torch.equal(first[0][1], first[1][1])  # another epoch, other draws


def test_mixing_stops_after_its_share_of_the_planned_steps():
    mixing = Mixing(TrainConfig(mixup=1.0, mixup_epochs=0.5), CLASSES)
    assert [mixing.epoch(0, step, 100) is not None for step in (0, 25, 49, 50, 75)] == [True] * 3 + [False] * 2
    assert Mixing(TrainConfig(mixup=1.0, mixup_epochs=0.0), CLASSES).epoch(0, 0, 100) is None


def test_mixing_never_waits_for_the_device():
    mixing = Mixing(TrainConfig(mixup=1.0, cutmix=1.0), CLASSES).epoch(0, 0, 100)
    with probe.HostSyncs() as syncs:
        for _ in range(6):
            mixing(*batch())
    assert syncs.count == 0, syncs.ops


@pytest.mark.parametrize("flags, problem", [({"mixup": -1.0}, "mixup"), ({"cutmix": 1.0, "batch_size": 7}, "even"),
                                            ({"mixup_prob": 1.5}, "mixup_prob"), ({"mixup_epochs": 2.0}, "mixup_epochs")])
def test_bad_mixing_settings_are_refused(flags, problem):
    with pytest.raises(ConfigError, match=problem):
        TrainConfig(**flags)
