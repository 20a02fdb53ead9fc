"""Test-time views: a weighted view set, and gated TTA (each view only where the ones before it leave an image unsure)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kaggle_cifar import distributed
from kaggle_cifar.augment import TTA_VIEWS, tta_view
from kaggle_cifar.inference import batch_probs, gated_probs, stream_probs, top_two_gap, with_temperature

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


def gated_by_hand(models: list, x: np.ndarray, views: list, gate: float, weights: list[float] | None = None):
    """What gated TTA means, image by image: each model's weighted mean over the shortest prefix of
    the set's distinct views (in its order) whose raw blend has a top-two gap of at least `gate`
    times the share of the set's views after it (all of them if none has); and how many distinct
    views each image took."""
    order = Counter(views)
    per_view = [{v: stream_probs([m], x, [v], CPU) for v in order} for m in models]
    weights = weights or [1 / len(models)] * len(models)
    means, took = [torch.empty(len(x), 5) for _ in models], []
    for i in range(len(x)):
        for k in range(1, len(order) + 1):
            prefix = list(order.items())[:k]
            each = [sum(c * p[v][i] for v, c in prefix) / sum(c for _, c in prefix) for p in per_view]
            top = sum(w * e for w, e in zip(weights, each)).log().topk(2).values
            to_come = 1 - sum(c for _, c in prefix) / len(views)
            if top[0] - top[1] >= gate * to_come or k == len(order):
                break
        for mean, e in zip(means, each):
            mean[i] = e
        took.append(k)
    return means, took


@pytest.mark.parametrize("tta", ["flip", "flip_translate", "flip_translate_weighted"])
def test_gated_tta_adds_each_view_only_for_the_images_the_views_before_it_leave_unsure(tta):
    model, x = Counted().eval(), images()
    views = TTA_VIEWS[tta]
    # The gap needed shrinks with the views still to come: three times the first view's median gap
    # leaves some images sure at once and some unsure to the last view.
    gate = 3 * float(top_two_gap(stream_probs([model], x, views[:1], CPU)).median())
    (expected,), took = gated_by_hand([model], x, views, gate)
    distinct = len(set(views))
    assert {1, distinct} <= set(took) and len(set(took)) >= min(3, distinct)  # some stop first, some later, some take all
    model.seen = 0
    gated, passes = gated_probs([model], x, views, gate, CPU)
    assert passes == model.seen == sum(took)  # each image through the views it took, once each
    torch.testing.assert_close(gated, expected)
    every = stream_probs([model], x, views, CPU)
    assert gated_probs([model], x, views, 0.0, CPU)[1] == len(x)  # a gate of 0: the first view for all
    torch.testing.assert_close(gated_probs([model], torch.from_numpy(x), views, 100.0, CPU)[0], every)


def test_gated_tta_over_recalibrated_models_gates_on_their_raw_blend_and_recalibrates_each_ones_view_mean():
    """The gate was scored on raw probabilities (bench/tta_gate.py): recalibrated, surer ones would
    send fewer images through the other views than the gate means."""
    models = [Counted(seed).eval() for seed in (0, 1)]
    x, views = images(), TTA_VIEWS["flip_translate"]
    weights, temperatures = [0.3, 0.7], [0.3, 3.0]
    first = [stream_probs([m], x, views[:1], CPU) for m in models]
    gate = 3 * float(top_two_gap(weights[0] * first[0] + weights[1] * first[1]).median())
    expected, took = gated_by_hand(models, x, views, gate, weights)
    gated, passes = gated_probs(models, x, views, gate, CPU, weights=weights, temperatures=temperatures)
    assert passes == sum(took) and {1, 6} <= set(took) and len(set(took)) >= 3
    torch.testing.assert_close(gated, sum(w * with_temperature(p, t) for w, p, t in zip(weights, expected, temperatures)))
