"""Interruptions, divergence and untrusted files: nothing finished is lost, nothing unsafe is run."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
import torch

from conftest import CALIBRATION, call_script, make_competition
from kaggle_cifar import checkpoint, distributed, train
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import train_folds
from kaggle_cifar.errors import CheckpointError, ConfigError, RunDirError, TrainingDiverged
from kaggle_cifar.rundir import run_meta

CFG = TrainConfig(folds=2, epochs=4, width=4, batch_size=4, lr=0.05)  # 9 training images: 2 steps an epoch
CPU = distributed.setup("cpu", "float32")  # as conftest.one_precision makes every run


@pytest.fixture
def small(tmp_path):
    return make_competition(tmp_path / "input", per_class=6, n_test=6)


def run(cfg, small, run_dir):
    return train_folds(cfg, small, run_dir, small / ".cache", CPU)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("changes", [{"auto_augment": "randaugment"},  # its per-image draws must replay too
                                     {"optimizer": "lookahead_muon"},  # its slow weights and step count too
                                     {"mixup": 0.4, "cutmix": 1.0, "mixup_epochs": 0.75}],  # timm's numpy draws too
                         ids=["randaugment", "lookahead", "mixup_cutmix"])
def test_killed_run_resumes_to_the_same_weights(small, tmp_path, monkeypatch, changes):
    cfg = dataclasses.replace(CFG, **changes)
    run(cfg, small, tmp_path / "straight")

    calls = {"n": 0}
    real_augment = train.augment

    def crash_in_epoch_3_of_fold_1(*args):
        calls["n"] += 1
        # after the calibration: fold 0 done (4 epochs x 2 steps), fold 1 epochs 1-2 done, mid epoch 3
        if calls["n"] == CALIBRATION + 4 * 2 + 2 * 2 + 2:
            raise KeyboardInterrupt("simulated kill")
        return real_augment(*args)

    monkeypatch.setattr(train, "augment", crash_in_epoch_3_of_fold_1)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, small, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "fold0" / "result.json").exists()
    assert not (tmp_path / "resumed" / "fold1" / "result.json").exists()
    assert torch.load(tmp_path / "resumed" / "fold1" / "last.pt", weights_only=True)["epoch"] == 1  # 0-based
    fold0_mtime = (tmp_path / "resumed" / "fold0" / "model.pt").stat().st_mtime_ns

    monkeypatch.setattr(train, "augment", real_augment)
    summary = run(cfg, small, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "fold0" / "model.pt").stat().st_mtime_ns == fold0_mtime  # finished fold skipped
    for fold in (0, 1):
        straight = weights(tmp_path / "straight" / f"fold{fold}" / "model.pt")
        resumed = weights(tmp_path / "resumed" / f"fold{fold}" / "model.pt")
        for name in straight:
            torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    assert summary["cv_accuracy"] == run(cfg, small, tmp_path / "straight")["cv_accuracy"]
    assert not list((tmp_path / "resumed").rglob(".*tmp*"))  # no temp files left behind


def test_run_dir_with_other_settings_is_refused_naming_each_change_and_the_ways_on(small, tmp_path):
    run(dataclasses.replace(CFG, epochs=1), small, tmp_path / "run")
    with pytest.raises(RunDirError) as refused:
        run(dataclasses.replace(CFG, epochs=2, crop_pad=0, whiten_stem=True), small, tmp_path / "run")
    assert str(refused.value) == (
        f"{tmp_path / 'run' / 'config.json'}: this run dir was made with a different config: "
        "whiten_stem: False -> True, epochs: 1 -> 2, crop_pad: 4 -> 0; use another --run-dir, or this run's own "
        "--no-whiten-stem --epochs 1 --crop-pad 4")


def test_a_holdout_that_empties_a_fold_of_a_class_is_refused_before_training(small, tmp_path):
    with pytest.raises(ConfigError, match=r"--holdout 14 leaves fold \d without images of \w+"):
        run(dataclasses.replace(CFG, holdout=14), small, tmp_path / "run")  # 18 images: 4 left for 2 folds, 3 classes
    assert not (tmp_path / "run").exists()


def test_bad_config_values_are_all_named_in_one_error_before_anything_runs(small, tmp_path):
    proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(tmp_path / "run"),
                       "--optimizer", "sgdd", "--lr", "-1", "--tta", "all", "--auto-augment", "autoaugment",
                       "--crop-fill", "mirror", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: invalid config: optimizer must be a timm optimizer name")
    assert "lr must be positive" in proc.stderr and "tta must be one of none, flip, flip_translate" in proc.stderr
    assert "auto_augment must be empty or one of randaugment, trivialaugment" in proc.stderr
    assert "crop_fill must be one of zeros, reflect" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "pseudo_threshold"])
def test_an_infinite_or_nan_value_is_refused_by_name(field):
    for value in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=rf"{field} must be a finite number, not {value}"):
            TrainConfig(**{field: value})


def test_the_optimizer_is_the_one_configured(small, tmp_path):
    run(dataclasses.replace(CFG, epochs=1, optimizer="lamb", lr=0.01), small, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["state"].values())))  # LAMB's moments, not SGD's buffer


def test_weight_decay_skips_norm_and_bias_unless_asked(small, tmp_path):
    def decays(cfg, name):
        run(cfg, small, tmp_path / name)
        groups = torch.load(tmp_path / name / "fold0" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
        return sorted((g["weight_decay"], len(g["params"])) for g in groups)

    default = decays(dataclasses.replace(CFG, epochs=1), "default")
    assert [wd for wd, _ in default] == [0.0, CFG.weight_decay]  # BN weights and biases in the first group
    everything = decays(dataclasses.replace(CFG, epochs=1, decay_norm_and_bias=True), "all")
    assert [wd for wd, _ in everything] == [CFG.weight_decay]
    assert everything[0][1] == sum(n for _, n in default)


def test_anneal_shape_is_the_configured_one(small, tmp_path):
    lrs = {}
    for anneal in ("linear", "cos"):
        run(dataclasses.replace(CFG, epochs=8, anneal=anneal), small, tmp_path / anneal)
        lrs[anneal] = [h["lr"] for h in torch.load(tmp_path / anneal / "fold0" / "last.pt", weights_only=True)["history"]]
    floor = CFG.lr / 25 / 100  # the last step's rate: peak / div_factor / final_div_factor
    assert lrs["linear"][-1] == pytest.approx(floor) and lrs["cos"][-1] == pytest.approx(floor)
    assert lrs["cos"][1] > lrs["linear"][1] and lrs["cos"][-2] < lrs["linear"][-2]  # above, then below the line


def test_boolean_config_flags_switch_both_ways():
    import argparse

    from kaggle_cifar.config import add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert config_from_args(parser.parse_args([])).decay_norm_and_bias is False
    assert config_from_args(parser.parse_args(["--decay-norm-and-bias"])).decay_norm_and_bias is True
    assert config_from_args(parser.parse_args(["--no-decay-norm-and-bias"])).decay_norm_and_bias is False


def test_nan_loss_stops_the_fold_and_keeps_the_last_good_checkpoint(small, tmp_path, monkeypatch):
    real_loss = torch.nn.CrossEntropyLoss
    calls = {"n": 0}

    class NanAfterTwoEpochs(real_loss):
        def forward(self, logits, targets):
            calls["n"] += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if calls["n"] > CALIBRATION + 4 else loss  # 2 steps per epoch

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanAfterTwoEpochs)
    with pytest.raises(TrainingDiverged, match=r"fold 0, epoch 3: training loss is nan; last good checkpoint kept"):
        run(CFG, small, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_tampered_checkpoint_is_refused_without_running_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"meta": {}, "model": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused, not a plain weights file \(it holds a posix\.system object"):
        checkpoint.load(path, {})
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_mismatched_checkpoint_is_refused(small, tmp_path):
    run(dataclasses.replace(CFG, epochs=1), small, tmp_path / "run")
    other = dataclasses.replace(CFG, width=8)
    with pytest.raises(CheckpointError, match=r"belongs to another run: width is 4, this run has 8"):
        checkpoint.load(tmp_path / "run" / "fold0" / "model.pt", run_meta(other, ["cat", "dog", "frog"]))
    with pytest.raises(CheckpointError, match=r"classes is \['cat', 'dog', 'frog'\], this run has"):
        checkpoint.load(tmp_path / "run" / "fold0" / "model.pt", run_meta(CFG, ["cat", "dog"]))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"meta": {}, "model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable checkpoint"):
        checkpoint.load(path, {})


def test_a_checkpoint_error_without_a_message_still_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    torch.save({"meta": {}}, path)

    def fails_silently(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(torch, "load", fails_silently)
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable checkpoint \(RuntimeError\)"):
        checkpoint.load(path, {})


def test_predict_refuses_a_run_with_a_missing_fold(small, tmp_path):
    run(dataclasses.replace(CFG, epochs=1), small, tmp_path / "run")
    (tmp_path / "run" / "fold1" / "model.pt").unlink()
    out = tmp_path / "sub.csv"
    proc = call_script("predict.py", "--input", str(small), "--run-dir", str(tmp_path / "run"), "--output", str(out),
                       check=False)
    assert proc.returncode == 2 and "fold1/model.pt: missing; fold 1 has not finished" in proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_ema_weights_are_the_ones_saved_for_predict(small, tmp_path):
    run(dataclasses.replace(CFG, epochs=2, ema_decay=0.5, cutout=8), small, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)
    final = weights(tmp_path / "run" / "fold0" / "model.pt")
    name = "1.head.2.weight"  # the classifier
    torch.testing.assert_close(final[name], last["ema"][f"module.{name}"], rtol=0, atol=0)
    assert not torch.equal(final[name], last["model"][name])


def test_lookahead_slow_weights_are_the_ones_evaluated_and_saved(small, tmp_path):
    cfg = dataclasses.replace(CFG, epochs=2)  # 4 steps: fewer than Lookahead's 6, so only the epochs' ends sync
    run(dataclasses.replace(cfg, optimizer="lookahead_muon"), small, tmp_path / "lookahead")
    run(cfg, small, tmp_path / "plain")
    last = torch.load(tmp_path / "lookahead" / "fold0" / "last.pt", weights_only=True)
    slow = [s["lookahead_slow_buff"] for s in last["optimizer"]["state"].values() if "lookahead_slow_buff" in s]
    name = "1.head.2.weight"  # the classifier
    final = weights(tmp_path / "lookahead" / "fold0" / "model.pt")[name]
    assert any(torch.equal(final, w) for w in slow)
    assert not torch.allclose(final, weights(tmp_path / "plain" / "fold0" / "model.pt")[name])


def test_ema_warm_up_follows_the_weights_in_a_short_run(small, tmp_path):
    cfg = dataclasses.replace(CFG, epochs=2, ema_decay=0.9999)  # 4 steps: without warm-up the EMA stays at init
    run(cfg, small, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)
    init = train.initial_model(cfg, 3, 0).state_dict()
    name = "1.head.2.weight"  # the classifier
    ema, trained = last["ema"][f"module.{name}"], last["model"][name]
    assert (ema - trained).norm() < 0.5 * (ema - init[name]).norm()


def test_epoch_metrics_go_to_csv_and_tensorboard(small, tmp_path):
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(dataclasses.replace(CFG, epochs=2), small, tmp_path / "run")
    log = pd.read_csv(tmp_path / "run" / "fold1" / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    events = EventAccumulator(str(tmp_path / "run" / "fold1" / "tensorboard"))
    events.Reload()
    val_acc = events.Scalars("val_acc")
    assert [e.step for e in val_acc] == [1, 2]
    assert [round(e.value, 5) for e in val_acc] == [round(v, 5) for v in log["val_acc"]]


def test_a_network_that_cannot_take_the_images_is_refused_before_the_run_dir_is_written(small, tmp_path):
    """timm's ViT checks its input size inside its forward pass: without this, a traceback in epoch 1."""
    with pytest.raises(ConfigError, match=r"--arch vit_tiny_patch16_224: fails on a 32x32 image \(AssertionError: "
                                          r"Input height \(32\) doesn't match model \(224\).*--image-size 224"):
        run(TrainConfig(folds=2, epochs=1, arch="vit_tiny_patch16_224", batch_size=4), small, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_next_epoch_trains_while_a_checkpoint_is_written_from_its_own_copy(small, tmp_path, monkeypatch):
    """A fast GPU's epoch lasts about as long as an fsynced 90 MB write: the write goes to a
    thread, from a copy taken at the epoch's end, so it holds that epoch's state exactly."""
    next_epoch_trained, overlapped, kept, training = threading.Event(), [], [], []
    real_save, real_epoch = checkpoint.save, train.train_one_epoch

    def slow_save(path, state):
        next_epoch_trained.clear()
        overlapped.append(next_epoch_trained.wait(timeout=3))  # a synchronous write would wait here in vain
        live = training[-1].model.state_dict()  # trained on since: the state written must not have moved with it
        kept.append(not all(torch.equal(state["model"][k], live[k]) for k in live))
        real_save(path, state)

    def epoch(t, cfg, data, e, *rest):
        metrics = real_epoch(t, cfg, data, e, *rest)
        training.append(t)
        next_epoch_trained.set()
        return metrics

    monkeypatch.setattr(checkpoint, "save", slow_save)
    monkeypatch.setattr(train, "train_one_epoch", epoch)
    cfg = TrainConfig(folds=2, epochs=3, width=8, batch_size=8, lr=0.05)
    train_folds(cfg, small, tmp_path / "run", small / ".cache", CPU)
    assert overlapped[:2] == [True, True]  # epochs 2 and 3 of fold 0 trained while epochs 1 and 2 were written
    assert kept[:2] == [True, True]  # each written from its own epoch's copy
    state = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 3  # the last epoch's own state


def test_a_checkpoint_that_fails_in_the_background_stops_the_fold_and_keeps_the_previous_one(small, tmp_path,
                                                                                              monkeypatch):
    calls, real_save = [], checkpoint.save

    def full_disk_on_the_second(path, state):
        calls.append(state["epoch"])
        if len(calls) == 2:
            raise CheckpointError(f"{path}: could not be written (disk full); the previous version, if any, is kept")
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", full_disk_on_the_second)
    cfg = TrainConfig(folds=2, epochs=4, width=8, batch_size=8, lr=0.05)
    with pytest.raises(CheckpointError, match="disk full"):
        train_folds(cfg, small, tmp_path / "run", small / ".cache", CPU)
    assert torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "run" / "fold0" / "result.json").exists() and calls == [0, 1]  # raised at the next save
