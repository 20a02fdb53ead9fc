"""--albumentations: a saved pipeline applied per image in worker processes, in order, replayable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

A = pytest.importorskip("albumentations")

from conftest import CALIBRATION, call_script, make_competition  # noqa: E402
from kaggle_cifar import distributed, train  # noqa: E402
from kaggle_cifar.config import TrainConfig  # noqa: E402
from kaggle_cifar.cv import check_named_files, train_folds  # noqa: E402
from kaggle_cifar.errors import ConfigError  # noqa: E402

CPU = distributed.setup("cpu", "float32")  # as conftest.one_precision makes every run


@pytest.fixture
def small(tmp_path):
    return make_competition(tmp_path / "input", per_class=6, n_test=3)


def test_the_pipeline_is_what_the_model_trains_on(small, tmp_path, monkeypatch):
    A.save(A.Compose([A.InvertImg(p=1.0)]), str(tmp_path / "invert.json"))
    cfg = TrainConfig(folds=2, epochs=1, width=8, batch_size=4, flip="none", crop_pad=0,
                      albumentations=str(tmp_path / "invert.json"))
    seen, real_augment = [], train.augment
    monkeypatch.setattr(train, "augment", lambda images, *args: seen.append(images) or real_augment(images, *args))
    train_folds(cfg, small, tmp_path / "run", small / ".cache", CPU)
    trained_on = torch.cat(seen[CALIBRATION:]).float().mean((0, 1, 2))  # calibration draws the images as they are
    originals = torch.from_numpy(np.load(next((small / ".cache").glob("train*.npy")))).float().mean((0, 1, 2))
    torch.testing.assert_close(trained_on, 255 - originals, atol=12, rtol=0)  # every image inverted (a sample of them)


def test_a_run_with_albumentations_replays_exactly_when_resumed(small, tmp_path, monkeypatch):
    A.save(A.Compose([A.Affine(translate_percent=(-0.2, 0.2), rotate=(-20, 20), p=0.8), A.CoarseDropout(p=0.5),
                      A.ColorJitter(p=0.5)]), str(tmp_path / "aug.yaml"), data_format="yaml")
    cfg = TrainConfig(folds=2, epochs=3, width=8, batch_size=4, albumentations=str(tmp_path / "aug.yaml"))
    train_folds(cfg, small, tmp_path / "straight", small / ".cache", CPU)
    calls, real_augment = {"n": 0}, train.augment

    def crash_in_epoch_2_of_fold_1(*args):
        calls["n"] += 1
        if calls["n"] == CALIBRATION + 3 * 2 + 2 + 1:  # fold 0 (3 epochs x 2 steps), fold 1 epoch 1, mid epoch 2
            raise KeyboardInterrupt("simulated kill")
        return real_augment(*args)

    monkeypatch.setattr(train, "augment", crash_in_epoch_2_of_fold_1)
    with pytest.raises(KeyboardInterrupt):
        train_folds(cfg, small, tmp_path / "resumed", small / ".cache", CPU)
    monkeypatch.setattr(train, "augment", real_augment)
    train_folds(cfg, small, tmp_path / "resumed", small / ".cache", CPU)
    for fold in (0, 1):
        straight, resumed = (torch.load(tmp_path / run / f"fold{fold}" / "model.pt", weights_only=True)["model"]
                             for run in ("straight", "resumed"))
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_a_file_that_is_no_usable_pipeline_is_refused_in_one_sentence(small, tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    A.save(A.Compose([A.Resize(16, 16)]), str(tmp_path / "resize.json"))
    for name, why in [("junk.json", "not an albumentations pipeline saved with A.save as json"),
                      ("resize.json", r"turns a uint8 \(32, 32, 3\) image into uint8 \(16, 16, 3\)"),
                      ("missing.json", "no such file")]:
        with pytest.raises(ConfigError, match=why):
            check_named_files(TrainConfig(albumentations=str(tmp_path / name)))
    proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(tmp_path / "run"),
                       "--albumentations", str(tmp_path / "resize.json"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --albumentations")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_pipeline_that_fails_only_in_a_worker_is_one_error_line_and_keeps_the_finished_epochs(small, tmp_path):
    """A transform drawn with probability 0.3 passes the one-image check, then meets a worker's image."""
    A.save(A.Compose([A.Resize(64, 64, p=0.3)]), str(tmp_path / "sometimes.json"))
    check_named_files(TrainConfig(albumentations=str(tmp_path / "sometimes.json")))  # passes
    proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(tmp_path / "run"), "--folds", "2",
                       "--epochs", "2", "--width", "4", "--batch-size", "4",
                       "--albumentations", str(tmp_path / "sometimes.json"), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: --albumentations {tmp_path / 'sometimes.json'}: failed in a worker process")
    assert "turns a uint8 (32, 32, 3) image into uint8 (64, 64, 3)" in last


def test_the_log_says_when_augmentation_is_the_bottleneck(small, tmp_path, caplog):
    import logging
    import time

    from tqdm import tqdm

    from kaggle_cifar.data import load_train
    from kaggle_cifar.folds import DeviceTrainSet, fold_split

    cfg = TrainConfig(folds=2, epochs=1, width=8, batch_size=4, albumentations="aug.json")
    train_set = load_train(small, small / ".cache", cfg.folds)
    data = DeviceTrainSet.of(train_set, torch.device("cpu")).fold(fold_split(cfg, train_set.labels), 0)
    t = train.build_training(cfg, data, CPU.policy)

    class SlowWorkers:  # stands in for HostAugmenter: batches that take 0.3 s each to arrive
        def epoch(self, batches, seed):
            for indices in batches:
                time.sleep(0.3)
                yield data.train_images[torch.from_numpy(indices)]

    with caplog.at_level(logging.WARNING), tqdm(disable=True) as bar:
        metrics = train.train_one_epoch(t, cfg, data, 0, bar, SlowWorkers())
    assert metrics["augment_wait_s"] >= 0.3  # the second batch's wait (the first is the workers' start-up)
    assert "augmentation, not the model, is the bottleneck" in caplog.text


def test_torchruns_ranks_on_one_machine_share_its_cores_among_their_workers(monkeypatch):
    from kaggle_cifar import host_augment

    monkeypatch.setattr(host_augment.os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert host_augment.workers() == 95
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert host_augment.workers() == 11  # 8 x 12 cores: 88 workers and 8 training loops, not 8 x 95


def test_shared_memory_too_small_for_the_workers_is_one_error_before_they_start(small, tmp_path, monkeypatch):
    """Docker gives a container 64 MB of /dev/shm unless told otherwise; a full-data fold's images
    alone are 123 MB."""
    from collections import namedtuple

    from kaggle_cifar import host_augment

    A.save(A.Compose([A.InvertImg(p=1.0)]), str(tmp_path / "invert.json"))
    images = torch.zeros((40_000, 32, 32, 3), dtype=torch.uint8)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(host_augment.SHARED_MEMORY.__class__, "is_dir", lambda self: True)
    monkeypatch.setattr(host_augment.shutil, "disk_usage", lambda path: usage(2**26, 0, 2**26))  # Docker's 64 MB
    monkeypatch.setattr(host_augment, "workers", lambda: 3)
    with pytest.raises(ConfigError, match=r"its workers need 122 MB of shared memory \(/dev/shm: .*\), and 64 MB "
                                          r"are free: in Docker start the container with --shm-size=1g"):
        host_augment.HostAugmenter(str(tmp_path / "invert.json"), images, False, 128)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(host_augment.shutil, "disk_usage", lambda path: usage(200 * 2**20, 0, 200 * 2**20))
    with pytest.raises(ConfigError, match=r"need 243 MB .* for 2 rank\(s\) here\), and 200 MB"):  # one rank's fits
        host_augment.HostAugmenter(str(tmp_path / "invert.json"), images, False, 128)
