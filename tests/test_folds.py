import numpy as np
import torch

from kaggle_cifar.folds import stratified_folds


def test_folds_are_stratified_disjoint_covering_and_seeded():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 4, 203)
    folds = stratified_folds(targets, 5, seed=3)
    assert folds.shape == targets.shape and set(folds) == set(range(5))  # each image in exactly one fold
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    for c in range(4):
        per_fold = np.bincount(folds[targets == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, f"class {c} is not spread evenly: {per_fold}"
    np.testing.assert_array_equal(folds, stratified_folds(targets, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(targets, 5, seed=4))


def on_device(images, targets):
    from kaggle_cifar.folds import DeviceTrainSet

    return DeviceTrainSet(images, targets, ["a", "b", "c"], torch.zeros(3), torch.ones(3))


def test_fold_split_keeps_held_out_images_out_of_training():
    images = torch.arange(30, dtype=torch.uint8).reshape(30, 1, 1, 1).expand(30, 2, 2, 3)  # image i is all i
    targets = torch.arange(30) % 3
    fold_of = stratified_folds(targets.numpy(), 3, seed=0)
    for k in range(3):
        data = on_device(images, targets).fold(fold_of, k)
        val = set(data.val_images[:, 0, 0, 0].tolist())
        train = set(data.train_images[:, 0, 0, 0].tolist())
        assert val == set(np.flatnonzero(fold_of == k).tolist())
        assert not val & train and len(val | train) == 30


def test_holdout_is_stratified_exact_and_outside_every_fold():
    from kaggle_cifar.folds import HOLDOUT

    targets = np.repeat([0, 1, 2, 3], [100, 50, 30, 20])
    plain = stratified_folds(targets, 4, seed=2)
    folds = stratified_folds(targets, 4, seed=2, holdout=40)
    held = folds == HOLDOUT
    assert held.sum() == 40
    np.testing.assert_array_equal(np.bincount(targets[held]), [20, 10, 6, 4])  # in proportion to class sizes
    assert set(folds[~held]) == set(range(4))
    for c in range(4):
        per_fold = np.bincount(folds[~held & (targets == c)], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    assert not np.array_equal(held, stratified_folds(targets, 4, seed=3, holdout=40) == HOLDOUT)
    assert (plain != HOLDOUT).all()


def test_holdout_images_are_in_no_fold_training_or_validation_set():
    from kaggle_cifar.folds import HOLDOUT

    images = torch.arange(30, dtype=torch.uint8).reshape(30, 1, 1, 1).expand(30, 2, 2, 3)
    targets = torch.arange(30) % 3
    fold_of = stratified_folds(targets.numpy(), 3, seed=0, holdout=6)
    holdout = set(np.flatnonzero(fold_of == HOLDOUT).tolist())
    for k in range(3):
        data = on_device(images, targets).fold(fold_of, k)
        assert set(data.holdout_images[:, 0, 0, 0].tolist()) == holdout
        seen = set(data.train_images[:, 0, 0, 0].tolist()) | set(data.val_images[:, 0, 0, 0].tolist())
        assert not seen & holdout and len(seen) == 24


def test_a_full_fit_trains_on_every_image_but_the_holdout_and_is_scored_on_the_holdout():
    from kaggle_cifar.folds import HOLDOUT

    images = torch.arange(30, dtype=torch.uint8).reshape(30, 1, 1, 1).expand(30, 2, 2, 3)
    targets = torch.arange(30) % 3
    fold_of = stratified_folds(targets.numpy(), 1, seed=0, holdout=6)
    data = on_device(images, targets).fold(fold_of, 0)
    holdout = set(np.flatnonzero(fold_of == HOLDOUT).tolist())
    assert set(data.val_images[:, 0, 0, 0].tolist()) == holdout  # its held-out (OOF) set: once, not twice
    assert len(data.holdout_images) == 0
    assert set(data.train_images[:, 0, 0, 0].tolist()) == set(range(30)) - holdout

    everything = on_device(images, targets).fold(stratified_folds(targets.numpy(), 1, seed=0), 0)
    assert len(everything.train_images) == 30 and len(everything.val_images) == len(everything.holdout_images) == 0


def test_a_split_seed_holds_out_the_same_images_for_runs_of_other_seeds():
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.data import Labels
    from kaggle_cifar.folds import fold_split

    labels = Labels(np.arange(1, 61), np.arange(60) % 3, ["a", "b", "c"])
    split = fold_split(TrainConfig(folds=3, holdout=6, seed=0), labels)
    np.testing.assert_array_equal(fold_split(TrainConfig(folds=3, holdout=6, seed=1, split_seed=0), labels), split)
    assert not np.array_equal(fold_split(TrainConfig(folds=3, holdout=6, seed=1), labels), split)  # --seed alone moves it
