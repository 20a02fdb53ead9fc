"""The benchmark scripts run end to end on CPU, so a GPU session never spends its time on a broken one."""

from __future__ import annotations

from conftest import ROOT, TINY, call_python

from kaggle_cifar.folds import HOLDOUT


def bench(name: str, *args: str) -> str:
    return call_python(ROOT / "bench" / name, *args).stdout


def test_bench_prints_the_pipeline_table_and_the_accuracy_report(competition):
    out = bench("bench.py", "--input", str(competition), *TINY, "--holdout", "12")
    for line in ("| decode train (cold cache) |", "| train fold 1 (after epoch 1) |", "| whole pipeline",
                 "| training FLOPs per image |", "| checkpoint save per epoch", "CV accuracy (out-of-fold, TTA flip_translate):", "fold ensemble"):
        assert line in out, f"{line!r} missing from:\n{out}"


def test_ablation_trains_each_chosen_variant_on_the_same_fold(competition, tmp_path):
    out = bench("ablate.py", "--input", str(competition), "--run-dir", str(tmp_path), *TINY,
                "--only", "default", "no_label_smoothing", "--fold", "1")
    table = out[out.index("| variant |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| default", "| no_label_smoothing"]
    assert (tmp_path / "no_label_smoothing" / "fold1" / "result.json").exists()
    assert not (tmp_path / "default" / "fold0").exists()
    assert '"label_smoothing": 0.0' in (tmp_path / "no_label_smoothing" / "config.json").read_text()


def test_the_architecture_table_measures_each_architecture(tmp_path):
    out = bench("archs.py", "--only", "resnet18_cifar", "fast_cifar", "--batch-size", "4", "--steps", "1")
    table = out[out.index("| arch |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| resnet18_cifar", "| fast_cifar"]
    assert "| resnet18_cifar | 11.2 M |" in out


def test_the_optimizer_table_times_each_optimizer_step():
    out = bench("optimizers.py", "--width", "4", "--steps", "1")
    table = out[out.index("| optimizer |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| sgd (fused)", "| timm's muon (bf16)", "| muon per shape, bf16",
                                                           "| muon in 3 padded batches, bf16", "| muon per shape, float32"]


def test_the_gpu_estimate_counts_each_muon_step_on_each_gpu():
    out = bench("gpu_estimate.py", "--width", "4")
    table = out[out.index("| gpu |"):].splitlines()
    assert [tuple(row.split(" | ")[:2]) for row in table[2:]] == [
        ("| H100 SXM", "timm's"), ("| H100 SXM", "batched (3)"), ("| H100 SXM", "batched (per shape)"),
        ("| T4", "timm's"), ("| T4", "batched (per shape)"), ("| T4", "batched (3)")]
    assert "Not measured on a GPU." in out


def test_the_tta_gate_table_scores_every_view_set_and_gate_on_the_holdout(competition, tmp_path):
    call_python(ROOT / "scripts" / "train_folds.py", "--input", str(competition), "--run-dir", str(tmp_path / "run"),
                *TINY, "--holdout", "12")
    out = bench("tta_gate.py", "--run-dir", str(tmp_path / "run"), "--gates", "0.5", "100", "--test-sample", "5")
    timed = [row.split(" | ") for row in out[out.index("| views | gate | test_images |"):].splitlines()[2:]]
    assert [row[:2] for row in timed[:6]] == [
        ["| flip_translate", "-"], ["| flip", "-"], ["| flip", "0.5"], ["| flip_translate", "0.5"], ["| flip", "100.0"],
        ["| flip_translate", "100.0"]] and timed[6] == [""]
    assert all(row[2] == "5" for row in timed[:6]) and timed[5][3] == "6.00"  # gate 100: every image all views
    table = out[out.index("| views | gate | accuracy |"):].splitlines()
    rows = [row.split(" | ")[:2] for row in table[2:]]
    assert rows == [[f"| {name}", gate] for name in ("flip", "flip_translate", "flip_translate_weighted")
                    for gate in ("-", "0.5", "100.0")]
    assert "12 holdout images" in out
    every_view = next(row for row in table if row.startswith("| flip_translate | 100.0 |")).split(" | ")
    assert every_view[3:] == ["+0.00", "6.00", "1.00 |"]  # gate 100 gives every image all views: the run's own
    flip = next(row for row in table if row.startswith("| flip | - |")).split(" | ")
    assert flip[-1] == "3.00 |"  # 2 views against the run's 6


def test_the_blend_table_scores_runs_alone_and_blended_on_their_shared_holdout(competition, tmp_path):
    import numpy as np
    import pandas as pd

    runs = [tmp_path / "narrow", tmp_path / "wide"]
    for run, width in zip(runs, ("4", "8")):
        call_python(ROOT / "scripts" / "train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY,
                    "--epochs", "2", "--holdout", "12", "--width", width)
    out = bench("blend.py", *map(str, runs))
    table = [row.split(" | ") for row in out[out.index("| ensemble |"):].splitlines()[2:]]
    assert [row[0] for row in table] == [f"| {runs[0]}", f"| {runs[1]}", "| equal weights", "| OOF weights",
                                         "| OOF weights, cross-fitted on holdout halves"]
    weights, temperatures = ([float(x) for x in table[3][column].split(" / ")] for column in (1, 2))
    assert [float(row[1]) for row in table[:2]] == weights and abs(sum(weights) - 1) < 2e-3
    assert [float(row[2]) for row in table[:2]] == temperatures and table[2][2] == "1.00 / 1.00"
    folds = pd.read_csv(runs[0] / "folds.csv")
    labels = pd.read_csv(competition / "trainLabels.csv").set_index("id").loc[folds["id"][folds["fold"] == HOLDOUT]]
    targets = pd.Categorical(labels["label"], categories=sorted(labels["label"].unique())).codes
    probs = [sum(np.load(run / f"fold{k}" / "holdout.npz")["flip_translate"] for k in (0, 1)) / 2 for run in runs]
    for row, p in zip(table, [*probs, (probs[0] + probs[1]) / 2]):  # each run's fold ensemble, then the two alike
        assert row[4] == f"{(p.argmax(1) == targets).mean():.4f} |"


def test_full_fits_blend_on_their_holdout_predictions_under_any_views_and_the_table_says_their_oof_weights_saw_it(
        competition, tmp_path):
    import numpy as np
    import pandas as pd

    from kaggle_cifar.folds import stratified_folds
    from kaggle_cifar.predict import cross_fitted

    runs = [tmp_path / "narrow", tmp_path / "wide"]
    for run, width in zip(runs, ("4", "8")):  # in one precision: the re-finish below predicts again, in the same
        call_python(ROOT / "scripts" / "train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY,
                    "--epochs", "2", "--holdout", "12", "--width", width, "--folds", "1", "--precision", "float32")
    frames = [pd.read_csv(run / "oof.csv") for run in runs]  # a full fit's out-of-fold images: the holdout
    targets = pd.Categorical(frames[0]["label"], categories=[c[2:] for c in frames[0].filter(like="p_")]).codes
    kept = [np.load(run / "fold0" / "holdout.npz") for run in runs]  # every view set, as a k-fold run keeps
    for frame, views in zip(frames, kept):
        np.testing.assert_allclose(views["flip_translate"], frame.filter(like="p_").to_numpy(), atol=1e-6)
    for tta in ("flip_translate", "flip"):
        out = bench("blend.py", *map(str, runs), "--tta", tta)
        table = [row.split(" | ") for row in out[out.index("| ensemble |"):].splitlines()[2:7]]
        probs = [views[tta] for views in kept]
        for row, p in zip(table[:3], [*probs, (probs[0] + probs[1]) / 2]):
            assert row[4] == f"{(p.argmax(1) == targets).mean():.4f} |"
        halves = cross_fitted(probs, targets, stratified_folds(targets, 2, seed=0) == 0)[0]
        assert table[4][0] == "| OOF weights, cross-fitted on holdout halves"
        assert table[4][4] == f"{(halves.argmax(1) == targets).mean():.4f} |"
    assert "12 out-of-fold and 12 holdout images" in out and "OOF weights were fitted on the images they are scored" in out
    assert "equal weights' and the cross-fitted row's are" in out
    (runs[1] / "fold0" / "holdout.npz").unlink()  # a full fit finished before full fits kept it
    refused = call_python(ROOT / "bench" / "blend.py", *map(str, runs), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"error: {runs[1] / 'fold0' / 'holdout.npz'}: missing; delete "
                                     f"{runs[1] / 'fold0' / 'result.json'} and run train_folds.py")
    (runs[1] / "fold0" / "result.json").unlink()  # as it says: the final files again, from the last checkpoint
    call_python(ROOT / "scripts" / "train_folds.py", "--input", str(competition), "--run-dir", str(runs[1]),
                "--config", str(runs[1] / "config.json"), "--precision", "float32")
    np.testing.assert_allclose(np.load(runs[1] / "fold0" / "holdout.npz")["flip"], kept[1]["flip"], atol=1e-6)
    assert bench("blend.py", *map(str, runs), "--tta", "flip") == out


def test_the_data_parallel_table_trains_one_fold_in_one_and_in_two_processes(competition):
    out = bench("data_parallel.py", "--input", str(competition), "--epochs", "2", "--width", "4", "--batch-size", "16",
                "--holdout", "12")
    table = out[out.index("| processes |"):].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 1", "| 2"]
    assert "| 0.0e+00 |" in table[2]  # the first run against itself
