"""--precision auto on a CPU with bf16 instructions: bf16 or float32, whichever trains faster as
measured before training, and measured again when the training speed moves (another process
started or stopped beside the run). The measurements are faked here (budget.calibrate, the epochs'
images/s), so the tests decide which precision is faster, on every CPU."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from conftest import kill_in, make_competition, record_newton_schulz
from kaggle_cifar import budget, device, distributed, train
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import train_folds
from kaggle_cifar.doctor import synthetic_fold
from kaggle_cifar.errors import ConfigError

CPU = torch.device("cpu")
CFG = TrainConfig(folds=2, epochs=2, width=4, batch_size=4, lr=0.05)


@pytest.fixture
def native(monkeypatch):
    """A CPU with AVX-512 BF16 or AMX, whichever CPU runs the tests (on one without, bf16 is
    emulated: slower, and as correct)."""
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)


def calibrations(monkeypatch, step_seconds: dict[str, float]) -> list[str]:
    """budget.calibrate measuring a training step at `step_seconds[precision]`; the precisions it
    measured, in order."""
    measured = []

    def fake(cfg, data, policy, *args, **kwargs):
        measured.append(policy.precision)
        return step_seconds[policy.precision], 0.001

    monkeypatch.setattr(budget, "calibrate", fake)
    return measured


def test_only_auto_on_a_cpu_with_bf16_instructions_measures_and_forced_bf16_needs_them(native, monkeypatch):
    auto = device.Policy.of(CPU)
    assert auto.measure_precision and [p.precision for p in auto.precision_candidates()] == ["bf16 autocast", "float32"]
    assert [p.newton_schulz_dtype for p in auto.precision_candidates()] == [torch.bfloat16, torch.float32]
    for fixed in (device.Policy.of(CPU, "bf16"), device.Policy.of(CPU, "float32"),
                  device.Policy.of(CPU, compile=True)):  # a compilation per candidate would cost minutes
        assert not fixed.measure_precision and fixed.precision_candidates() == (fixed,)
    assert device.Policy.of(CPU, "bf16").precision == "bf16 autocast"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.Policy.of(CPU).precision == "float32" and not device.Policy.of(CPU).measure_precision
    with pytest.raises(ConfigError, match="--precision bf16: cpu has no bf16 arithmetic of its own"):
        device.Policy.of(CPU, "bf16")


@pytest.mark.parametrize("faster", ["bf16 autocast", "float32"])
def test_a_run_trains_in_the_precision_measured_faster(native, faster, tmp_path, monkeypatch):
    slower = ({"bf16 autocast", "float32"} - {faster}).pop()
    measured = calibrations(monkeypatch, {faster: 0.1, slower: 0.3})
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    summary = train_folds(CFG, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu"))
    assert measured == ["float32", "bf16 autocast"]  # each once, before training; the reference first
    assert summary["estimate"]["precision"] == faster and summary["precision_by_fold"] == [faster, faster]
    for fold in range(2):
        assert set(pd.read_csv(tmp_path / "run" / f"fold{fold}" / "log.csv")["precision"]) == {faster}


def test_a_resumed_run_measures_the_precision_again(native, tmp_path, monkeypatch):
    """A resume may be on another day, beside other work: its precision is chosen anew."""
    calibrations(monkeypatch, {"bf16 autocast": 0.1, "float32": 0.3})
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    real_epoch = kill_in(monkeypatch, fold=1, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        train_folds(CFG, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu"))
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    measured = calibrations(monkeypatch, {"bf16 autocast": 0.3, "float32": 0.1})  # now float32 is faster
    summary = train_folds(CFG, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu"))
    assert measured == ["float32", "bf16 autocast"]
    assert summary["precision_by_fold"] == ["bf16 autocast", "bf16 autocast then float32"]
    assert "estimate" not in summary  # the resumed fold's plan and time are its own; only the precision is new


def rows(*speeds: float, steps: int = 200) -> list[dict]:
    return [{"epoch": e, "train_images_per_s": s, "steps": steps} for e, s in enumerate(speeds, 1)]


def test_a_training_speed_that_moves_past_the_margin_has_both_precisions_measured_again(native, monkeypatch):
    measured = calibrations(monkeypatch, {"bf16 autocast": 0.3, "float32": 0.1})  # another process started
    data, watch = synthetic_fold(16, CPU), budget.PrecisionWatch(device.Policy.of(CPU))
    first, second, within, slowed, after = rows(50.0, 100.0, 100.0 * (1 - 0.9 * budget.PRECISION_MARGIN), 50.0, 80.0)
    assert not any(watch.after_epoch(CFG, data, row) for row in (first, second, within))  # a start-up, the reference, noise
    assert measured == [] and watch.policy.precision == "bf16 autocast"
    assert watch.after_epoch(CFG, data, slowed) and measured == ["float32", "bf16 autocast"]
    assert watch.policy.precision == "float32" and watch.policy.measure_precision  # and it keeps watching
    assert not watch.after_epoch(CFG, data, after) and len(measured) == 2  # float32's first epoch: its reference


def test_epochs_too_short_to_read_never_cost_a_measurement(native, monkeypatch):
    """A measurement takes 14 steps: an epoch of fewer than ten times that is not read, however
    its speed moved (the tests' epochs of two steps among them)."""
    measured = calibrations(monkeypatch, {"bf16 autocast": 0.3, "float32": 0.1})
    data, watch = synthetic_fold(16, CPU), budget.PrecisionWatch(device.Policy.of(CPU))
    short = 10 * 2 * (budget.WARMUP_STEPS + budget.CALIBRATION_STEPS) - 1
    assert not any(watch.after_epoch(CFG, data, row) for row in rows(50.0, 100.0, 10.0, 500.0, steps=short))
    assert measured == []
    fixed = budget.PrecisionWatch(device.Policy.of(CPU, "bf16"))  # a precision given is never measured
    assert not any(fixed.after_epoch(CFG, data, row) for row in rows(50.0, 100.0, 10.0, 500.0))
    assert measured == []


@pytest.mark.parametrize("bf16_step_seconds, bf16_steps, faster", [(10.0, 2, "float32"), (0.5, 7, "bf16 autocast")])
def test_a_candidate_is_measured_only_until_it_has_taken_twice_the_references_whole_calibration(
        native, bf16_step_seconds, bf16_steps, faster, monkeypatch, caplog):
    """float32 first, 7 steps of a second each on a fake clock: bf16 at 10 s a step has taken 20 s,
    past twice float32's 7, after its second step, and stops there, slower (the Intel Xeon beside
    another process: 0.1x); bf16 at 0.5 s a step trains all of its steps and is chosen."""
    now, stepped = [0.0], []
    monkeypatch.setattr(budget, "clock", lambda: now[0])
    real_step = train.train_step

    def timed_step(t, *args, **kwargs):
        now[0] += {"float32": 1.0, "bf16 autocast": bf16_step_seconds}[t.policy.precision]
        stepped.append(t.policy.precision)
        return real_step(t, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", timed_step)
    caplog.set_level("INFO")
    fastest, speed = budget.fastest_precision(CFG, synthetic_fold(16, CPU), device.Policy.of(CPU))
    calibration = budget.WARMUP_STEPS + budget.CALIBRATION_STEPS
    assert stepped == ["float32"] * calibration + ["bf16 autocast"] * bf16_steps
    assert fastest.precision == faster and speed.step_seconds == min(1.0, bf16_step_seconds)
    bf16 = "stopped, slower" if faster == "float32" else f"{CFG.batch_size / bf16_step_seconds:,.0f} images/s"
    assert f"measured: bf16 autocast {bf16}, float32 4 images/s: {faster} trains" in caplog.text


@pytest.mark.parametrize("bf16_image_seconds, bf16_images, faster", [(0.1, 256, "float32"), (0.005, 768, "bf16 autocast")])
def test_a_forward_pass_candidate_is_stopped_after_its_warm_up_past_twice_the_references_measurement(
        native, bf16_image_seconds, bf16_images, faster, monkeypatch, caplog):
    """float32 first, 768 images (a warm-up batch of 256, then 512 timed) at 0.01 s each on a fake
    clock: bf16 at 0.1 s an image has taken 25.6 s, past twice float32's 7.68, after its warm-up,
    and stops there, slower; bf16 at 0.005 s an image forwards all 768 and is chosen."""
    now, forwarded = [0.0], []
    monkeypatch.setattr(budget, "clock", lambda: now[0])

    def timed_probs(models, images, views, policy, batch_size):
        now[0] += len(images) * {"float32": 0.01, "bf16 autocast": bf16_image_seconds}[policy.precision]
        forwarded.extend([policy.precision] * len(images))

    monkeypatch.setattr(budget, "stream_probs", timed_probs)
    caplog.set_level("INFO")
    images = synthetic_fold(1024, CPU).train_images
    assert budget.fastest_for_inference([], images, device.Policy.of(CPU)).precision == faster
    assert forwarded == ["float32"] * 768 + ["bf16 autocast"] * bf16_images
    bf16 = "stopped, slower" if faster == "float32" else "200 images/s"
    assert f"measured: bf16 autocast {bf16}, float32 100 images/s: {faster} predicts" in caplog.text


class SwitchAfter:
    """A PrecisionWatch that switches to float32 after epoch `epoch`."""

    def __init__(self, policy: device.Policy, epoch: int):
        self.policy, self.epoch = policy, epoch

    def after_epoch(self, cfg, data, row) -> bool:
        if row["epoch"] != self.epoch:
            return False
        self.policy = self.policy.precision_candidates()[1]
        return True


@pytest.mark.parametrize("optimizer", ["muon", "lookahead_muon"])
def test_a_fold_switched_to_float32_trains_on_in_float32_muon_included(native, optimizer, tmp_path, monkeypatch):
    from kaggle_cifar.rundir import RunDir

    orthogonalised = record_newton_schulz(monkeypatch)
    cfg = dataclasses.replace(CFG, folds=1, holdout=4, epochs=4, optimizer=optimizer, lr=0.02)
    data = synthetic_fold(16, CPU)
    run = RunDir(tmp_path / "run")
    watch = SwitchAfter(device.Policy.of(CPU), epoch=2)
    steps_per_epoch = len(data.train_targets) // cfg.batch_size
    train.train_fold(cfg, data, run.fold(0), watch.policy, precision=watch)
    log = run.fold(0).read_log()
    assert list(log["precision"]) == ["bf16 autocast"] * 2 + ["float32"] * 2
    per_step = len(orthogonalised) // (4 * steps_per_epoch)
    assert orthogonalised == [torch.bfloat16] * (2 * steps_per_epoch * per_step) + [torch.float32] * (2 * steps_per_epoch * per_step)
    assert run.fold(0).read_result()["precision"] == "bf16 autocast then float32"


@pytest.mark.parametrize("faster", ["bf16 autocast", "float32"])
def test_predictions_are_made_in_the_precision_whose_forward_pass_measured_faster(native, faster, monkeypatch):
    timed = []

    def fake(models, images, policy, batch_size, limit):
        timed.append((policy.precision, policy.compile, len(images)))
        return 0.001 if policy.precision == faster else 0.003

    monkeypatch.setattr(budget, "forward_seconds", fake)
    images = synthetic_fold(1024, CPU).train_images
    assert budget.fastest_for_inference([], images, device.Policy.of(CPU)).precision == faster
    probe = budget.PRECISION_PROBE_IMAGES
    assert timed == [("float32", False, probe), ("bf16 autocast", False, probe)]  # eager, a few hundred images
    forced = device.Policy.of(CPU, "bf16")
    assert budget.fastest_for_inference([], images, forced) is forced and len(timed) == 2
