"""Test-time views: a weighted view set, and gated TTA (the other views only where the first is unsure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_cifar import distributed
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.inference import batch_probs, gated_probs, stream_probs, with_temperature

CPU = distributed.setup("cpu", "float32").policy


class Counted(torch.nn.Module):
    """A fixed random linear classifier of uint8 NCHW images that counts the images it sees."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 5)
        torch.nn.init.normal_(self.linear.weight, std=0.05, generator=torch.Generator().manual_seed(seed))
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


def test_gated_tta_over_recalibrated_models_gates_on_their_raw_blend_and_recalibrates_each_ones_whole_view_mean():
    """The gate was scored on raw probabilities (bench/tta_gate.py): recalibrated, surer ones would
    send fewer images through the other views than the gate means."""
    models = [Counted(seed).eval() for seed in (0, 1)]
    x, views = images(), TTA_VIEWS["flip_translate"]
    weights, temperatures = [0.3, 0.7], [0.3, 3.0]
    first = [stream_probs([m], x, views[:1], CPU) for m in models]
    every = [stream_probs([m], x, views, CPU) for m in models]
    raw = weights[0] * first[0] + weights[1] * first[1]
    gate = float(raw.max(1).values.median())
    gated, unsure = gated_probs(models, x, views, gate, CPU, weights=weights, temperatures=temperatures)
    took_all = raw.max(1).values < gate
    assert unsure == int(took_all.sum()) and 0 < unsure < len(x)
    each = [torch.where(took_all[:, None], e, f) for e, f in zip(every, first)]
    torch.testing.assert_close(gated, sum(w * with_temperature(p, t) for w, p, t in zip(weights, each, temperatures)))
