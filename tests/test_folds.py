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


def test_fold_split_keeps_held_out_images_out_of_training():
    from kaggle_cifar.cv import fold_data

    images = torch.arange(30, dtype=torch.uint8).reshape(30, 1, 1, 1).expand(30, 2, 2, 3)  # image i is all i
    targets = torch.arange(30) % 3
    fold_of = stratified_folds(targets.numpy(), 3, seed=0)
    for k in range(3):
        data = fold_data(images, targets, fold_of, k)
        val = set(data.val_images[:, 0, 0, 0].tolist())
        train = set(data.train_images[:, 0, 0, 0].tolist())
        assert val == set(np.flatnonzero(fold_of == k).tolist())
        assert not val & train and len(val | train) == 30
