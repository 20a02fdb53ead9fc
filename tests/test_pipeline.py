"""End to end: train_folds then predict on a tiny competition, through the real scripts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLASSES, NATIVE_BF16, TINY, call_script, run_script
from kaggle_cifar import checkpoint, distributed, plots
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.config import TTA_GATE, TrainConfig
from kaggle_cifar.data import cached_images, load_test
from kaggle_cifar.device import Policy
from kaggle_cifar.errors import RunDirError
from kaggle_cifar.inference import load_fold_models, stream_probs, with_temperature
from kaggle_cifar.predict import (blend_weights, blended, calibrated_blend, cross_fitted, ensemble_probs, oof_weights,
                                  recalibrated, temperature)
from kaggle_cifar.report import nll
from kaggle_cifar.rundir import RunDir, run_meta

CPU = Policy.of(torch.device("cpu"), "float32")  # as conftest.one_precision makes every run


def test_train_then_predict_from_the_run_dir_alone_writes_a_valid_submission(competition, tmp_path):
    run = tmp_path / "my run"  # a name a shell splits: the next commands printed quote it
    said = call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY).stderr
    assert said.strip().splitlines()[-1] == \
        f"next: python scripts/predict.py --run-dir '{run}' --output submissions/sub.csv"
    report = json.loads((run / "report.json").read_text())
    assert report["classes"] == sorted(CLASSES)
    assert len(report["fold_accuracy"]) == 2
    assert report["cv_accuracy"] > 0.8  # chance is 1/3

    assert json.loads((run / "input.json").read_text()) == {"input": str(competition),
                                                            "cache_dir": str(competition / ".cache")}
    proc = call_script("predict.py", "--run-dir", str(run))  # the run knows its input (./input is empty)
    sub = pd.read_csv(io.StringIO(proc.stdout), dtype=str)  # stdout holds the CSV and nothing else
    assert list(sub.columns) == ["id", "label"]
    assert sub["id"].tolist() == [str(i) for i in range(1, 25)]
    assert set(sub["label"]) <= set(CLASSES)
    truth = np.asarray(sorted(CLASSES))[np.load(tmp_path / "input_test_targets.npy")]
    assert (sub["label"].to_numpy() == truth).mean() > 0.8


def test_oof_probabilities_come_from_the_model_that_held_the_image_out(competition, tmp_path):
    run = tmp_path / "run"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY)
    cfg = TrainConfig.from_json(run / "config.json")
    classes = json.loads((run / "classes.json").read_text())
    folds = pd.read_csv(run / "folds.csv")
    oof = pd.read_csv(run / "oof.csv")
    assert oof["id"].tolist() == folds["id"].tolist()
    images = cached_images(competition / "train", folds["id"].to_numpy(), competition / ".cache")
    models = load_fold_models(RunDir(run), cfg, classes, CPU)
    prob_columns = [f"p_{c}" for c in classes]
    for k, model in enumerate(models):
        held_out = (folds["fold"] == k).to_numpy()
        policy = finished_in(run, k)
        expected = stream_probs([model], images[held_out], TTA_VIEWS[cfg.tta], policy).numpy()
        np.testing.assert_allclose(oof.loc[held_out, prob_columns].to_numpy(), expected, atol=1e-5)
        # and the other fold's model gives different probabilities for these images
        other = stream_probs([models[1 - k]], images[held_out], TTA_VIEWS[cfg.tta], policy).numpy()
        assert not np.allclose(other, expected, atol=1e-3)
    fold_ckpt = checkpoint.load(run / "fold0" / "model.pt", run_meta(cfg, classes))
    assert fold_ckpt["meta"]["classes"] == classes


def test_predict_orders_ids_numerically(tmp_path):
    from conftest import make_competition

    competition = make_competition(tmp_path / "input", per_class=4, n_test=12)
    run = tmp_path / "run"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), "--folds", "2", "--epochs", "1",
                "--width", "4", "--batch-size", "8")
    out = tmp_path / "sub.csv"
    call_script("predict.py", "--input", str(competition), "--run-dir", str(run), "--tta", "none", "--output", str(out))
    assert pd.read_csv(out)["id"].tolist() == list(range(1, 13))  # 10, 11, 12 after 9, not after 1


def test_report_pictures_are_made_by_training_and_by_report_script(competition, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY[:-4])
    pictures = sorted((run / "report").glob("*.png"))
    assert [p.name for p in pictures] == ["confusion.png", "curves.png", "mistakes.png", "per_class.png"]
    for p in pictures:
        with Image.open(p) as image:
            assert image.size[0] > 300 and image.size[1] > 150
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn
        p.unlink()
    proc = run_script("report.py", "--run-dir", str(run))  # the run dir alone: it knows its input
    assert proc.stdout.startswith("CV accuracy (out-of-fold, TTA flip_translate): ")  # the report as training ended it
    assert {Path(line).name for line in proc.stdout.splitlines()[-4:]} == {p.name for p in pictures}
    assert all(p.exists() for p in pictures)
    fig = plots.learning_curves(RunDir(run), 2)  # epochs on the x axis are whole numbers, not 1.5 or 2.5
    assert all(float(tick).is_integer() for ax in fig.axes for tick in ax.get_xticks())


def test_config_round_trips_and_flags_override_it(competition, tmp_path):
    first = tmp_path / "first"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(first), *TINY[:-2], "--epochs", "1",
                "--label-smoothing", "0.05")
    saved = TrainConfig.from_json(first / "config.json")
    assert saved.label_smoothing == 0.05 and saved.epochs == 1 and saved.width == 8
    second = tmp_path / "second"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(second), "--config",
                str(first / "config.json"), "--seed", "7")
    import dataclasses
    assert TrainConfig.from_json(second / "config.json") == dataclasses.replace(saved, seed=7)


def finished_in(run: Path, fold: int) -> Policy:
    """The policy fold `fold` of a script's run predicted its held-out images in: on a CPU with
    bf16 instructions the run measures which precision is faster."""
    last = RunDir(run).fold(fold).read_result()["precision"].split(" then ")[-1]
    return dataclasses.replace(CPU, autocast_dtype={"bf16 autocast": torch.bfloat16, "float32": None}[last])


def train_with_holdout(competition, run, *flags) -> SimpleNamespace:
    """train_folds.py with TINY, a 12-image holdout and `flags`; what the run wrote, its fold models,
    and the holdout's images and true classes."""
    from kaggle_cifar.folds import HOLDOUT

    proc = call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY, "--holdout", "12",
                       *flags)
    cfg = TrainConfig.from_json(run / "config.json")
    classes = json.loads((run / "classes.json").read_text())
    folds = pd.read_csv(run / "folds.csv")
    held = (folds["fold"] == HOLDOUT).to_numpy()
    labels = pd.read_csv(competition / "trainLabels.csv").set_index("id").loc[folds["id"][held], "label"]
    return SimpleNamespace(
        stderr=proc.stderr, report=json.loads((run / "report.json").read_text()), cfg=cfg, folds=folds, held=held,
        images=cached_images(competition / "train", folds["id"].to_numpy(), competition / ".cache")[held],
        truth=np.searchsorted(classes, labels.to_numpy()), models=load_fold_models(RunDir(run), cfg, classes, CPU))


def test_holdout_measures_single_folds_and_the_fold_ensemble_on_unseen_images(competition, tmp_path):
    run = tmp_path / "run"
    r = train_with_holdout(competition, run)
    assert r.held.sum() == 12 and r.report["holdout"]["images"] == 12
    assert not set(pd.read_csv(run / "oof.csv")["id"]) & set(r.folds["id"][r.held])  # holdout is not OOF
    assert "fold ensemble" in r.stderr

    # The ensemble figure is the mean of the fold models' probabilities on exactly the holdout images.
    for name, views in TTA_VIEWS.items():
        singles = [stream_probs([m], r.images, views, finished_in(run, k)).numpy() for k, m in enumerate(r.models)]
        ensemble = np.mean(singles, axis=0)
        assert r.report["holdout"]["ensemble_accuracy"][name] == (ensemble.argmax(1) == r.truth).mean()
        for k, single in enumerate(singles):
            np.testing.assert_allclose(np.load(run / f"fold{k}" / "holdout.npz")[name], single, atol=1e-5)
        np.testing.assert_allclose(r.report["holdout"]["single_fold_accuracy"][name],
                                   [(single.argmax(1) == r.truth).mean() for single in singles])
    assert set(r.report["fold_accuracy_by_tta"]) == set(TTA_VIEWS)
    np.testing.assert_allclose(r.report["fold_accuracy_by_tta"][r.cfg.tta], r.report["fold_accuracy"])


def test_a_full_fit_trains_one_model_on_all_but_the_holdout_and_is_scored_there(competition, tmp_path):
    run = tmp_path / "run"
    r = train_with_holdout(competition, run, "--folds", "1")
    assert r.held.sum() == 12 and (r.folds["fold"][~r.held] == 0).all() and len(r.models) == 1
    assert json.loads((run / "fold0" / "result.json").read_text())["train_images"] == 48
    oof = pd.read_csv(run / "oof.csv")
    assert oof["id"].tolist() == r.folds["id"][r.held].tolist()  # its OOF is the holdout, scored by its one model
    assert "cv_accuracy" not in r.report and "holdout" not in r.report  # no cross-validation; the holdout once
    for name, views in TTA_VIEWS.items():
        probs = stream_probs(r.models, r.images, views, finished_in(run, 0)).numpy()
        assert r.report["fold_accuracy_by_tta"][name] == [(probs.argmax(1) == r.truth).mean()]
    assert r.report["holdout_accuracy"] == r.report["fold_accuracy_by_tta"][r.cfg.tta][0] > 0.8
    assert f"holdout accuracy (full fit, TTA {r.cfg.tta}): {r.report['holdout_accuracy']:.4f}" in r.stderr
    assert sorted(p.name for p in (run / "report").glob("*.png")) == \
        ["confusion.png", "curves.png", "mistakes.png", "per_class.png"]


def test_a_full_fit_without_a_holdout_trains_on_every_image_and_predicts(competition, tmp_path):
    from kaggle_cifar.cv import train_folds

    cfg = TrainConfig(folds=1, epochs=4, width=8, batch_size=16, lr=0.05)  # TINY's, one fold
    summary = train_folds(cfg, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu"))
    assert {k: summary[k] for k in summary if k not in ("computed_on", "device", "precision_by_fold", "estimate")} == \
        {"classes": sorted(CLASSES), "fold_accuracy_by_tta": {}}  # no accuracy to report: nothing held out
    log = pd.read_csv(tmp_path / "run" / "fold0" / "log.csv")
    assert log["val_acc"].isna().all() and (log["val_images"] == 0).all()
    assert json.loads((tmp_path / "run" / "fold0" / "result.json").read_text())["train_images"] == 60
    assert [p.name for p in (tmp_path / "run" / "report").glob("*.png")] == ["curves.png"]
    ids, probs, classes, _ = ensemble_probs(competition, [tmp_path / "run"], competition / ".cache", distributed.setup("cpu"))
    truth = np.asarray(sorted(CLASSES))[np.load(tmp_path / "input_test_targets.npy")]
    assert (np.asarray(classes)[probs.argmax(1)] == truth).mean() > 0.8


def test_compiled_training_step_computes_what_the_eager_one_does(competition, tmp_path):
    """torch.compile is on by default on GPUs; tracing it here catches graph breaks and wrong results on CPU."""
    flags = ["--input", str(competition), "--folds", "2", "--epochs", "1", "--width", "4", "--batch-size", "16"]
    call_script("train_folds.py", *flags, "--run-dir", str(tmp_path / "eager"), "--no-compile")
    call_script("train_folds.py", *flags, "--run-dir", str(tmp_path / "compiled"), "--compile")
    for fold in range(2):
        eager = np.load(tmp_path / "eager" / f"fold{fold}" / "oof.npy")
        compiled = np.load(tmp_path / "compiled" / f"fold{fold}" / "oof.npy")
        np.testing.assert_allclose(compiled, eager, atol=1e-3)
        assert not np.allclose(eager, eager.mean(0), atol=1e-3)  # the probabilities are not all alike


def test_predict_ensembles_every_fold_of_every_run_with_equal_weight(competition, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(a), *TINY)
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(b), *TINY, "--folds", "3", "--seed", "1")
    cpu, cache = distributed.setup("cpu"), competition / ".cache"
    ids, probs_a, classes, _ = ensemble_probs(competition, [a], cache, cpu)
    probs_b = ensemble_probs(competition, [b], cache, cpu)[1]
    probs = ensemble_probs(competition, [a, b], cache, cpu)[1]
    np.testing.assert_allclose(probs, (2 * probs_a + 3 * probs_b) / 5, atol=1e-6)  # 2 + 3 folds, each the same weight
    np.testing.assert_allclose(ensemble_probs(competition, [a], cache, cpu, gate=100.0)[1], probs_a, atol=1e-6)  # all unsure
    assert not np.allclose(probs_a, probs_b, atol=1e-3)  # so the check above tells the weights apart

    proc = call_script("predict.py", "--input", str(competition), "--run-dir", str(a), "--ensemble", str(b))
    sub = pd.read_csv(io.StringIO(proc.stdout))
    gated = ensemble_probs(competition, [a, b], cache, cpu, gate=TTA_GATE)[1]  # predict's default
    assert sub["label"].tolist() == np.asarray(classes)[gated.argmax(1)].tolist()
    assert re.search(rf"^gated TTA: each next of the \d views only for the images whose top two classes are still "
                     rf"under {TTA_GATE} x the share of views to come apart .*: [\d.]+ views an image", proc.stderr,
                     flags=re.M)  # a process alone names no rank
    assert re.search(r"^\d+ images, [\d.]+ views an image on average", proc.stderr, flags=re.M)

    with pytest.raises(RunDirError, match=r"--weights oof: .* holds out other images than .*use --weights equal"):
        ensemble_probs(competition, [a, b], cache, cpu, weights="oof")  # 2 folds against 3
    with pytest.raises(RunDirError, match=rf"^{re.escape(str(b / '..' / 'a'))}: in the ensemble twice"):
        ensemble_probs(competition, [a, b, b / ".." / "a"], cache, cpu)  # the same run, however it is spelled
    (b / "classes.json").write_text(json.dumps(["ant", "bee", "cow"]) + "\n")
    with pytest.raises(RunDirError, match=r"trained on the classes \['ant', 'bee', 'cow'\]"):
        ensemble_probs(competition, [a, b], cache, cpu)


def test_predict_weighs_runs_by_their_out_of_fold_predictions(competition, tmp_path):
    """Runs with the same fold split (another width here) weigh as their OOF blend fits, each run's
    folds sharing its weight and each fold model's probabilities recalibrated by its run's
    temperature; the weights and temperatures are logged and recorded."""
    a, c = tmp_path / "a", tmp_path / "c"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(a), *TINY)
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(c), *TINY, "--width", "4", "--epochs", "1")
    cpu, cache = distributed.setup("cpu"), competition / ".cache"
    classes = json.loads((a / "classes.json").read_text())
    temperatures, weights, _ = oof_weights([RunDir(a), RunDir(c)], classes)
    assert weights.sum() == pytest.approx(1) and weights[0] != pytest.approx(0.5, abs=0.01)
    assert all(t != pytest.approx(1, abs=0.01) for t in temperatures)
    images = load_test(competition, cache)[1]

    def recalibrated_run(run: Path, t: float) -> np.ndarray:  # each fold model recalibrated, then their mean
        cfg = RunDir(run).read()[0]
        return np.mean([with_temperature(stream_probs([m], images, TTA_VIEWS[cfg.tta], CPU), t).numpy()
                        for m in load_fold_models(RunDir(run), cfg, classes, CPU)], axis=0)

    predicted = ensemble_probs(competition, [a, c], cache, cpu, weights="oof")[1]
    np.testing.assert_allclose(predicted, weights[0] * recalibrated_run(a, temperatures[0])
                               + weights[1] * recalibrated_run(c, temperatures[1]), atol=1e-5)
    sub = tmp_path / "sub.csv"
    proc = call_script("predict.py", "--input", str(competition), "--run-dir", str(a), "--ensemble", str(c),
                       "--weights", "oof", "--output", str(sub))
    record = json.loads((tmp_path / "sub.csv.json").read_text())  # the submission's record, beside it
    assert record["runs"] == [str(a), str(c)] and record["by"] == "oof" and record["tta"] == "flip_translate"
    np.testing.assert_allclose(record["weights"], weights, atol=1e-9)
    np.testing.assert_allclose(record["temperatures"], temperatures, atol=1e-9)
    assert record["csv_sha256"] == hashlib.sha256(sub.read_bytes()).hexdigest()
    oof = [pd.read_csv(run / "oof.csv") for run in (a, c)]
    labels = oof[0]["label"].to_numpy()
    oof_probs = [frame[[f"p_{name}" for name in classes]].to_numpy() for frame in oof]
    fitted = sum(w * recalibrated(p, t) for w, p, t in zip(weights, oof_probs, temperatures))

    def hits(p: np.ndarray) -> str:
        return f"{(np.asarray(classes)[p.argmax(1)] == labels).mean():.4f}"

    assert (f"ensemble weights fitted on 60 out-of-fold predictions: {a} {weights[0]:.3f} (temperature "
            f"{temperatures[0]:.2f}), {c} {weights[1]:.3f} (temperature {temperatures[1]:.2f}); "
            f"their OOF accuracy: {a} {hits(oof_probs[0])}, {c} {hits(oof_probs[1])}, equal weights "
            f"{hits(oof_probs[0] + oof_probs[1])}, these weights {hits(fitted)}") in proc.stderr
    assert f"{record['oof_accuracy']['these weights']:.4f}" == hits(fitted)


def test_blend_weights_find_the_least_log_loss():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 400)
    truth = np.eye(3)[targets]
    good = 0.7 * truth + 0.1  # right with 0.8
    noise = rng.dirichlet(np.ones(3), 400)
    first = np.arange(400)[:, None] < 100  # sure of a quarter of the images, unsure of the rest
    sure_early = np.where(first, 0.9 * truth + 0.1 / 3, 1 / 3)
    sure_late = np.where(first, 1 / 3, 0.6 * truth + 0.4 / 3)
    assert blend_weights([good, noise], targets)[0] > 0.95
    weights = blend_weights([sure_early, sure_late], targets)
    grid = np.linspace(0, 1, 1001)
    losses = [nll(w * sure_early + (1 - w) * sure_late, targets) for w in grid]
    assert nll(weights[0] * sure_early + weights[1] * sure_late, targets) <= min(losses) + 1e-6
    # 100 log(1/3 + 0.6 w) + 300 log(0.6 + 0.4/3 - 0.4 w) is largest at w = 1/24: a mixture, not one model
    assert weights[0] == pytest.approx(1 / 24, abs=1e-3)


def test_a_temperature_undoes_a_softening_of_probabilities():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 2000)
    logits = torch.tensor(2 * np.eye(3)[targets] + rng.normal(size=(2000, 3)))
    probs = logits.softmax(1).numpy()
    t = temperature(probs, targets)
    assert temperature(recalibrated(probs, 3.0), targets) == pytest.approx(t / 3, rel=1e-3)
    assert recalibrated(probs, 0.5).max(1).mean() > probs.max(1).mean()  # below 1 sharpens
    np.testing.assert_array_equal(recalibrated(probs, 0.5).argmax(1), probs.argmax(1))


def test_an_under_confident_model_weighs_in_the_blend_as_much_as_a_confident_one_that_knows_as_much():
    """Two models of the same skill with independent errors, one softened (as heavier label smoothing
    leaves it): its raw probabilities lose log loss for being unsure, not wrong, so the weights of a
    raw blend push it out; recalibrated first, both weigh alike and the blend beats either."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 4000)
    signal = 2.5 * np.eye(10)[targets]
    sure, unsure = (torch.tensor(signal + rng.normal(size=signal.shape)) for _ in range(2))
    probs = [sure.softmax(1).numpy(), (unsure / 4).softmax(1).numpy()]
    raw = blend_weights(probs, targets)
    temperatures, weights = calibrated_blend(probs, targets)
    assert raw[1] < 0.2 and weights[1] == pytest.approx(0.5, abs=0.1)
    assert temperatures[1] == pytest.approx(temperatures[0] / 4, rel=0.15)

    def hits(w: np.ndarray, ts: list[float]) -> float:
        return float((sum(x * recalibrated(p, t) for x, p, t in zip(w, probs, ts)).argmax(1) == targets).mean())

    assert hits(weights, temperatures) > max(hits(raw, [1.0, 1.0]), *((p.argmax(1) == targets).mean() for p in probs))


def test_cross_fitted_blend_weights_each_half_by_the_other_halfs_labels_alone():
    """The measurement OOF weights of full fits lack: a half's blend may not see that half's labels.
    Two models, each informative where the other is noise; relabelling the first half at random
    leaves its blend as it was (its weights come from the second half) and changes the second's."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 2000)
    signal = [torch.tensor(s * np.eye(10)[targets] + rng.normal(size=(2000, 10))) for s in (3.0, 1.0)]
    probs = [x.softmax(1).numpy() for x in signal]
    first = np.arange(2000) % 2 == 0
    blend, fits = cross_fitted(probs, targets, first)
    relabelled = np.where(first, rng.integers(0, 10, 2000), targets)
    again, refits = cross_fitted(probs, relabelled, first)
    np.testing.assert_array_equal(again[first], blend[first])
    assert not np.allclose(again[~first], blend[~first])
    assert refits[0][1] == pytest.approx(fits[0][1]) and fits[0][1][0] > fits[0][1][1]  # the surer model weighs more
    temperatures, weights = calibrated_blend([p[~first] for p in probs], targets[~first])
    np.testing.assert_allclose(blend[first], blended([p[first] for p in probs], weights, temperatures))


def test_runs_are_compared_in_one_table_and_one_picture(competition, tmp_path):
    runs = []
    for name, extra in [("narrow", ["--width", "4"]), ("fast", ["--recipe", "fast", "--width", "8", "--holdout", "6"])]:
        runs.append(tmp_path / name)
        call_script("train_folds.py", "--input", str(competition), "--run-dir", str(runs[-1]), "--epochs", "2",
                    "--batch-size", "16", *(["--folds", "2"] if name == "narrow" else []), *extra)
    proc = call_script("report.py", "--compare", *map(str, runs), "--picture", str(tmp_path / "compare.png"))
    header, rule, narrow, fast = proc.stdout.strip().splitlines()
    assert header.startswith("| run | recipe | settings | accuracy | TTA none | TTA flip | TTA flip_translate |")
    assert "| - | arch=resnet18_cifar, width=4, folds=2, holdout=0, crop_pad=4 | CV " in narrow
    assert "| fast | arch=fast_cifar, width=8, folds=1, holdout=6, crop_pad=2 | holdout " in fast
    report = json.loads((runs[1] / "report.json").read_text())
    assert f"holdout {report['holdout_accuracy']:.4f}" in fast and "cpu (" in fast  # its own figures, its device
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_the_quick_start_says_how_long_what_it_chose_and_what_to_run_next(competition, tmp_path):
    """README's quick start as a user runs it (a time budget, no recipe), on tiny data. What fits in
    the budget depends on this machine's speed and load (the calibrations are part of the budget),
    so the choice is checked against what the run measured; test_time_budget checks it exactly."""
    run = tmp_path / "run"
    train = run_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), "--time-budget", "45")
    said = train.stderr
    report = json.loads((run / "report.json").read_text())
    expected = {name: m["expected_accuracy"] for name, m in report["recipe_choice"]["candidates"].items()
                if m["expected_accuracy"]}
    chosen = max(expected, key=expected.get) if expected else None  # most expected in the epochs that fit
    assert report["recipe_choice"]["chosen"] == chosen
    assert f"--time-budget 45 without --recipe, on cpu: {chosen or 'the defaults, no recipe measured for this budget'} (" \
        in said  # the recipe chosen, and why
    assert "fast: " in said and "fast_wide: " in said and "resnet18: its learning curve not measured" in said
    assert re.search(r"\d folds? x [\d.]+ epochs at [\d,]+ images/s: about \d+ s in all on cpu in "
                     r"(bf16 autocast|float32)", said)
    measured = re.search(r"precision on cpu, measured: bf16 autocast ([\d,]+ images/s|stopped, slower), float32 [\d,]+ images/s: "
                         r"(bf16 autocast|float32) trains", said)
    assert bool(measured) == NATIVE_BF16  # where the CPU has bf16 instructions, the faster is measured
    assert json.loads((run / "config.json").read_text())["recipe"] == (chosen or "")
    next_line = said.strip().splitlines()[-1]
    assert next_line == f"next: python scripts/predict.py --run-dir {run} --output submissions/sub.csv"
    sub = tmp_path / "sub.csv"
    predicted = run_script(*next_line.removeprefix("next: python scripts/").replace("submissions/sub.csv", str(sub)).split())
    assert predicted.stderr.strip().splitlines()[-1] == \
        f"wrote {sub} and its record sub.csv.json: 24 rows, valid; next: python scripts/submit.py {sub} --run-dir {run}"
