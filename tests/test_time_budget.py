"""--time-budget: every fold ends inside the budget with a complete schedule, planned from the
measured speed, planned again when the speed changes, and kept on resume. Time is a fake clock
that a training step advances, so the tests are exact whatever the machine's load."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from conftest import CALIBRATION, kill_in, make_competition
from kaggle_cifar import budget, distributed, train
from kaggle_cifar.config import TrainConfig, parse_duration
from kaggle_cifar.cv import train_folds
from kaggle_cifar.errors import ConfigError

CPU = distributed.setup("cpu", "float32")  # as conftest.one_precision makes every run
CFG = TrainConfig(folds=2, width=4, batch_size=4, lr=0.05, time_budget="60")  # 9 training images: 2 steps an epoch
FLOOR = CFG.lr / 25 / 100  # the schedule's last rate


class StepClock:
    """budget.clock, advanced by `cost` seconds at every training step (calibration's included)."""

    def __init__(self, monkeypatch, cost: float = 1.0):
        self.now, self.cost, self.steps = 1000.0, cost, 0
        monkeypatch.setattr(budget, "clock", lambda: self.now)
        real_step = train.train_step

        def timed_step(*args, **kwargs):
            self.now += self.cost
            self.steps += 1
            return real_step(*args, **kwargs)

        monkeypatch.setattr(train, "train_step", timed_step)


@pytest.fixture
def small(tmp_path):
    return make_competition(tmp_path / "input", per_class=6, n_test=3)


def test_the_tests_count_the_calibration_steps_the_run_takes():
    assert CALIBRATION == budget.WARMUP_STEPS + budget.CALIBRATION_STEPS


def test_durations_are_read_as_a_person_writes_them():
    assert [parse_duration(t) for t in ("900", "90s", "15m", "2h", "1h30m", "0.5h")] == \
        [900, 90, 900, 7200, 5400, 1800]
    with pytest.raises(ConfigError, match=r"time_budget '15 minutes': give seconds, or a duration such as 15m"):
        TrainConfig(time_budget="15 minutes")
    with pytest.raises(ConfigError, match=r"time_budget '1h30': 30 of what\? Give its unit, e.g. 1h30m"):
        TrainConfig(time_budget="1h30")  # 30 minutes or 30 seconds: refused, not guessed
    with pytest.raises(ConfigError, match=r"time_budget '0m': no time to train in"):
        TrainConfig(time_budget="0m")


def test_every_fold_trains_the_same_epochs_and_ends_inside_the_budget_with_a_complete_schedule(small, tmp_path,
                                                                                               monkeypatch):
    clock = StepClock(monkeypatch)
    summary = train_folds(CFG, small, tmp_path / "run", small / ".cache", CPU)
    spent = summary["time_budget"]
    assert spent["used_s"] <= 60 and spent["used_s"] == clock.now - 1000
    first, second = spent["epochs_per_fold"]
    assert first == second >= 8  # calibration is the run's, not fold 0's: the folds train alike
    assert spent["used_s"] >= 0.95 * 60  # the budget is used to the step, a fraction of an epoch included
    assert not spent["plans"][0]["replans"]  # a steady machine is planned once
    for fold, epochs in enumerate(spent["epochs_per_fold"]):
        log = pd.read_csv(tmp_path / "run" / f"fold{fold}" / "log.csv")
        assert log["steps"].sum() == round(epochs * 2)  # 2 steps an epoch
        assert log["lr"].iloc[-1] == pytest.approx(FLOOR)  # the schedule ran to its end
        assert log["lr"].max() == pytest.approx(CFG.lr, rel=0.1)


def test_a_slower_machine_gets_fewer_epochs_and_a_fold_that_slows_down_is_planned_again(small, tmp_path, monkeypatch):
    StepClock(monkeypatch, cost=0.5)
    planned_fast = train_folds(CFG, small, tmp_path / "fast", small / ".cache", CPU)["time_budget"]["epochs_per_fold"]
    slow = StepClock(monkeypatch, cost=1.0)
    real_epoch = train.train_one_epoch

    def slowing(t, cfg, data, epoch, *rest):  # fold 0 slows down threefold from its fourth epoch
        slow.cost = 3.0 if data.fold == 0 and epoch >= 3 else 1.0
        return real_epoch(t, cfg, data, epoch, *rest)

    monkeypatch.setattr(train, "train_one_epoch", slowing)
    summary = train_folds(CFG, small, tmp_path / "slow", small / ".cache", CPU)
    result = json.loads((tmp_path / "slow" / "fold0" / "result.json").read_text())
    replans = result["plan"]["replans"]
    assert replans and replans[0] == {"fold": 0, "after_epoch": 4, "epochs": replans[0]["epochs"]}
    assert len({r["after_epoch"] for r in replans}) == len(replans)  # at most one re-plan an epoch
    assert summary["time_budget"]["epochs_per_fold"][1] < planned_fast[1]
    assert summary["time_budget"]["used_s"] <= 60 + 2 * 3.0  # at most the one epoch the slow-down was late by
    log = pd.read_csv(tmp_path / "slow" / "fold0" / "log.csv")
    assert log["lr"].iloc[-1] == pytest.approx(FLOOR)


def test_a_resumed_fold_keeps_its_plan(small, tmp_path, monkeypatch):
    clock = StepClock(monkeypatch)
    real_epoch = kill_in(monkeypatch, fold=1, epoch=3)
    with pytest.raises(KeyboardInterrupt):
        train_folds(CFG, small, tmp_path / "run", small / ".cache", CPU)
    planned = torch.load(tmp_path / "run" / "fold1" / "last.pt", weights_only=True)["plan"]["epochs"]
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    steps_before = clock.steps
    summary = train_folds(CFG, small, tmp_path / "run", small / ".cache", CPU)
    assert summary["time_budget"]["epochs_per_fold"][1] == round(planned * 2) / 2  # the plan's steps, 2 an epoch
    assert clock.steps - steps_before == round(planned * 2) - 3 * 2  # no calibration again, the remaining steps only


def test_the_recipes_a_budget_chooses_from_are_planned_in_the_time_left_once_all_are_measured(small, tmp_path,
                                                                                                 monkeypatch):
    """Every calibration step costs 1 s here, so the fast recipes run alike. The choice reads each
    curve at the epochs that fit in what the run's budget has left once every recipe is measured,
    and the run trains those, measured no third time; given the whole budget from its own
    measurement, each was read at 29.1 epochs of which the run then trained 8.1."""
    clock = StepClock(monkeypatch)
    summary = train_folds(TrainConfig(time_budget="30"), small, tmp_path / "run", small / ".cache", CPU)
    choice = summary["recipe_choice"]
    planned = {name: m["epochs"] for name, m in choice["candidates"].items() if m["epochs"] is not None}
    assert set(planned) == {"fast", "fast_wide"} and planned["fast"] == planned["fast_wide"]
    plan = summary["time_budget"]["plans"][0]
    assert plan["epochs"] == planned[choice["chosen"]] and not plan["replans"]
    assert clock.steps == 2 * CALIBRATION + round(summary["time_budget"]["epochs_per_fold"][0])  # no third calibration


def test_a_full_fit_keeps_time_back_only_for_predicting_its_holdout_once(small, tmp_path, monkeypatch):
    from kaggle_cifar.inference import DISTINCT_VIEWS

    clock = StepClock(monkeypatch)
    monkeypatch.setattr(budget, "forward_seconds", lambda *args, **kwargs: 0.25)  # per image predicted
    real_evaluate = train.evaluate

    def timed_evaluate(model, images, *args):  # as long as the calibration said: no re-plan rescales the reserve
        clock.now += 0.25 * len(images)
        return real_evaluate(model, images, *args)

    monkeypatch.setattr(train, "evaluate", timed_evaluate)
    summary = train_folds(dataclasses.replace(CFG, folds=1, holdout=6), small, tmp_path / "run", small / ".cache", CPU)
    plan = summary["time_budget"]["plans"][0]
    assert plan["reserve_s"] == pytest.approx(len(DISTINCT_VIEWS) * 6 * 0.25)  # its 6 held-out images, each view once
    assert summary["time_budget"]["used_s"] <= 60 and summary["time_budget"]["epochs_per_fold"][0] >= 8


def test_a_full_fit_with_nothing_to_predict_uses_its_whole_budget(small, tmp_path, monkeypatch):
    clock = StepClock(monkeypatch, cost=0.9)
    summary = train_folds(dataclasses.replace(CFG, folds=1), small, tmp_path / "run", small / ".cache", CPU)
    assert 0.97 * 60 - 0.9 <= clock.now - 1000 <= 60  # to the step
    assert summary["time_budget"]["epochs_per_fold"][0] % 1 != 0  # ends inside an epoch, its last one partial


def test_after_the_first_measured_epoch_a_time_that_wobbles_within_the_margin_leaves_the_plan_alone(small, tmp_path, monkeypatch):
    clock = StepClock(monkeypatch)
    real_epoch = train.train_one_epoch

    def wobbling(t, cfg, data, epoch, *rest):  # every other epoch 10% slower, as a busy machine's noise
        clock.cost = 1.1 if epoch % 2 else 1.0
        return real_epoch(t, cfg, data, epoch, *rest)

    monkeypatch.setattr(train, "train_one_epoch", wobbling)
    summary = train_folds(CFG, small, tmp_path / "run", small / ".cache", CPU)
    replans = summary["time_budget"]["plans"][1]["replans"]  # the run's, as its last fold ends
    assert [r["after_epoch"] for r in replans] == [2]  # the first measured epoch replaces the calibration's guess
    first, second = summary["time_budget"]["epochs_per_fold"]
    assert first == second


def test_a_machine_that_slows_down_keeps_more_time_back_for_the_final_predictions(monkeypatch):
    """The final predictions run on the same slowed machine as the epochs: a re-plan scales the
    time kept for them by the epochs' slow-down (a neighbour that started mid-run made a full-data
    fold's holdout predictions take 3x their estimate, bench/RESULTS.md)."""
    now = [0.0]
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    plan = budget.Plan(600, start=0.0, folds_left=2)
    plan.make(budget.Speed(step_seconds=0.1, epoch_s=10.0, reserve_s=20.0, images_per_s=100.0))
    for done in (1, 2, 3):  # every epoch twice as long as calibrated
        now[0] += 20.0
        plan.after_epoch(done, 0)
    assert plan.epoch_seconds == pytest.approx(20.0) and plan.reserve_s == pytest.approx(40.0)
    assert plan.epochs == pytest.approx((0.97 * 600 - 60 - 2 * 40) / 20 / 2 + 3 / 2, abs=0.01)
