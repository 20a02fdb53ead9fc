"""Pseudo-labelling: fold k learns from its own first-round fold only, and only confident test images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import TINY, call_script, make_competition
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.data import load_test
from kaggle_cifar.device import Policy
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.inference import load_fold_model, stream_probs
from kaggle_cifar.pseudo import most_confident, open_teacher, pseudo_labelled
from kaggle_cifar.rundir import RunDir

CPU = Policy.of(torch.device("cpu"), "float32")  # as conftest.one_precision makes every run


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    return make_competition(tmp_path_factory.mktemp("pseudo") / "input")


@pytest.fixture(scope="module")
def first_round(competition):
    run = competition.parent / "first"  # trained once for the module; the tests only read it
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY)
    return run


def test_each_fold_takes_the_confident_test_images_of_its_own_first_round_fold(competition, first_round):
    cfg = TrainConfig.from_json(first_round / "config.json")
    classes = json.loads((first_round / "classes.json").read_text())
    _, test_images = load_test(competition, competition / ".cache")
    teacher = open_teacher(first_round, (first_round / "folds.csv").read_text(), classes)
    chosen = []
    for fold in range(2):
        model = load_fold_model(RunDir(first_round), cfg, classes, fold, CPU)
        probs = stream_probs([model], test_images, TTA_VIEWS[cfg.tta], CPU)
        threshold = float(probs.max(1).values.median())  # about half the images pass
        student = dataclasses.replace(cfg, pseudo_labels=str(first_round), pseudo_threshold=threshold, pseudo_max=0)
        images, labels = pseudo_labelled(student, teacher, fold, test_images, CPU)
        expected = (probs.max(1).values >= threshold).numpy()
        np.testing.assert_array_equal(images.numpy(), test_images[expected])
        np.testing.assert_array_equal(labels.numpy(), probs.argmax(1).numpy()[expected])
        chosen.append(expected)
    assert 0 < chosen[0].sum() < len(test_images)
    assert not np.array_equal(chosen[0], chosen[1])  # the two folds' teachers pick differently
    above_all = float(np.nextafter(np.float32(probs.max()), np.float32(2)))  # above fold 1's most confident image
    hopeless = dataclasses.replace(student, pseudo_threshold=min(1.0, above_all))
    assert probs.max() < 1.0  # so that nothing passes
    with pytest.raises(ConfigError, match=r"its fold 1 gives no test image a probability of --pseudo-threshold"):
        pseudo_labelled(hopeless, teacher, 1, test_images, CPU)


def test_second_round_trains_on_its_images_plus_the_pseudo_labelled_ones(competition, first_round, tmp_path):
    cfg = TrainConfig.from_json(first_round / "config.json")
    classes = json.loads((first_round / "classes.json").read_text())
    _, test_images = load_test(competition, competition / ".cache")
    confidences = [stream_probs([load_fold_model(RunDir(first_round), cfg, classes, fold, CPU)],
                                 test_images, TTA_VIEWS[cfg.tta], CPU).max(1).values for fold in range(2)]
    threshold = float(f"{min(c.median() for c in confidences):.6f}")  # every fold gets at least half
    second = tmp_path / "second"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(second), *TINY,  # the teacher
                "--pseudo-labels", str(first_round), "--pseudo-threshold", str(threshold), "--precision", "float32")  # as here
    for fold in range(2):
        confident = int((confidences[fold] >= threshold).sum())
        first = json.loads((first_round / f"fold{fold}" / "result.json").read_text())
        result = json.loads((second / f"fold{fold}" / "result.json").read_text())
        assert confident > 0 and result["train_images"] == first["train_images"] + confident
    assert json.loads((second / "report.json").read_text())["cv_accuracy"] > 0.8


def test_a_first_round_with_another_fold_split_is_refused(competition, first_round, tmp_path):
    folds_csv = (first_round / "folds.csv").read_text()
    classes = json.loads((first_round / "classes.json").read_text())
    assert open_teacher(first_round, folds_csv, classes).cfg.folds == 2
    swapped = folds_csv.replace(",0\n", ",x\n").replace(",1\n", ",0\n").replace(",x\n", ",1\n")
    with pytest.raises(ConfigError, match=r"its fold split differs from this run's"):
        open_teacher(first_round, swapped, classes)
    proc = call_script("train_folds.py", "--input", str(competition), "--run-dir", str(tmp_path / "other"),
                       *TINY, "--seed", "1", "--pseudo-labels", str(first_round), check=False)
    assert proc.returncode == 2 and "fold split differs" in proc.stderr


def test_a_limit_keeps_the_most_confident_of_each_class_in_equal_shares():
    confidence = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.60, 0.95, 0.50, 0.94])
    predicted = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0])
    assert most_confident(confidence, predicted, 0.55, 0, 2).tolist() == [0, 1, 2, 3, 4, 5, 7]
    # 2 per class: class 0's two best; class 1 has only 5 and 4 above the threshold
    assert most_confident(confidence, predicted, 0.55, 4, 2).tolist() == [0, 1, 4, 5]
    assert most_confident(confidence, predicted, 0.97, 4, 2).tolist() == [0, 1]
