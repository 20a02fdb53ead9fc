"""Test-time views: a weighted view set, and gated TTA (the other views only where the first is unsure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_cifar import distributed
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.inference import batch_probs, gated_probs, stream_probs

CPU = distributed.setup("cpu", "float32").policy


class Counted(torch.nn.Module):
    """A fixed random linear classifier of uint8 NCHW images that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 5)
        torch.nn.init.normal_(self.linear.weight, std=0.05, generator=torch.Generator().manual_seed(0))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.linear(x.float().flatten(1) / 255)


def images(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_the_weighted_view_set_weighs_the_untranslated_pair_as_the_four_shifted_views_and_predicts_each_once():
    model = Counted().eval()
    x = torch.from_numpy(images()).permute(0, 3, 1, 2)
    weighted = batch_probs([model], x, TTA_VIEWS["flip_translate_weighted"], CPU)
    assert model.seen == 6 * len(x)
    per_view = {v: model(tta_view(x, v)).softmax(1) for v in TTA_VIEWS["flip_translate"]}
    untranslated = sum(p for (flip, dy, dx), p in per_view.items() if dy == dx == 0) / 2
    shifted = sum(p for (flip, dy, dx), p in per_view.items() if dy or dx) / 4
    torch.testing.assert_close(weighted, (untranslated + shifted) / 2)


@pytest.mark.parametrize("tta", ["flip", "flip_translate", "flip_translate_weighted"])
def test_gated_tta_gives_the_first_views_prediction_to_the_sure_and_the_whole_sets_to_the_unsure(tta):
    model, x = Counted().eval(), images()
    views = TTA_VIEWS[tta]
    first = stream_probs([model], x, views[:1], CPU)
    every = stream_probs([model], x, views, CPU)
    gate = float(first.max(1).values.median())
    model.seen = 0
    gated, unsure = gated_probs([model], x, views, gate, CPU)
    took_all = first.max(1).values < gate
    assert unsure == int(took_all.sum()) and 0 < unsure < len(x)
    assert model.seen == len(x) + unsure * (len(set(views)) - 1)  # the other views only for the unsure
    torch.testing.assert_close(gated[took_all], every[took_all])
    torch.testing.assert_close(gated[~took_all], first[~took_all])
    assert gated_probs([model], x, views, 0.0, CPU)[1] == 0  # no gate: the first view for all
    torch.testing.assert_close(gated_probs([model], torch.from_numpy(x), views, 1.01, CPU)[0], every)
