"""scripts/submit.py: validates before any upload; Kaggle's errors in plain words. The Kaggle CLI is
replaced at the process boundary by a fake `kaggle` executable on PATH that records its arguments."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_competition


def fake_kaggle(bin_dir, exit_code=0, output="Successfully submitted to CIFAR-10"):
    bin_dir.mkdir()
    script = bin_dir / "kaggle"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {bin_dir / 'called'}\necho '{output}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def submit(competition, sub, bin_dir, run_dir, *extra):
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "submit.py"), str(sub), "--input", str(competition),
                           "--run-dir", str(run_dir), *extra], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def setup(tmp_path):
    competition = make_competition(tmp_path / "input", per_class=4, n_test=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"folds": 2, "width": 8}')
    (run_dir / "classes.json").write_text('["cat", "dog", "frog"]')
    (run_dir / "report.json").write_text('{"cv_accuracy": 0.91234}')
    sub = tmp_path / "sub.csv"
    sub.write_text("id,label\n1,cat\n2,dog\n3,frog\n")
    return competition, run_dir, sub, tmp_path


def test_valid_submission_is_uploaded_with_a_message_from_the_run(setup):
    competition, run_dir, sub, tmp = setup
    bin_dir = fake_kaggle(tmp / "bin")
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 0, proc.stderr
    called = (bin_dir / "called").read_text()
    assert called.startswith(f"competitions submit -c cifar-10 -f {sub} -m 2-fold resnet18_cifar w8")
    assert "CV 0.9123" in called

    (run_dir / "config.json").write_text('{"folds": 1, "width": 8}')
    (run_dir / "report.json").write_text('{"holdout_accuracy": 0.8765}')
    assert submit(competition, sub, bin_dir, run_dir).returncode == 0
    called = (bin_dir / "called").read_text()
    assert "-m full fit resnet18_cifar w8" in called and "holdout 0.8765" in called


def test_a_submissions_record_names_its_ensemble_in_the_message_unless_the_file_changed_since(setup):
    competition, run_dir, sub, tmp = setup
    bin_dir = fake_kaggle(tmp / "bin")
    record = {"runs": [str(run_dir), "runs/other"], "weights": [0.625, 0.375], "by": "oof", "tta": "flip",
              "tta_gate": 0.7, "csv_sha256": hashlib.sha256(sub.read_bytes()).hexdigest()}
    (tmp / "sub.csv.json").write_text(json.dumps(record))
    assert submit(competition, sub, bin_dir, run_dir).returncode == 0
    called = (bin_dir / "called").read_text()
    assert "tta flip gate 0.7" in called and called.rstrip().endswith("ensemble of 2 runs, oof weights 0.62/0.38")

    sub.write_text("id,label\n1,dog\n2,dog\n3,frog\n")  # another submission written over it by other means
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 0 and "records another sub.csv" in proc.stderr
    assert "ensemble" not in (bin_dir / "called").read_text()  # the message is the run's alone

    (tmp / "sub.csv.json").write_text('{"runs": [')
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp / 'sub.csv.json'}: not the record")
    assert "Traceback" not in proc.stderr


def test_invalid_submission_never_reaches_kaggle(setup):
    competition, run_dir, sub, tmp = setup
    sub.write_text("id,label\n1,cat\n3,frog\n2,dog\n")
    bin_dir = fake_kaggle(tmp / "bin")
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 2 and "ids are not 1..3 in order" in proc.stderr
    assert not (bin_dir / "called").exists()


def test_rules_not_accepted_is_explained(setup):
    competition, run_dir, sub, tmp = setup
    bin_dir = fake_kaggle(tmp / "bin", exit_code=1, output="403 - Forbidden - You must accept the rules of this competition")
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 2 and "accept the competition rules first" in proc.stderr


@pytest.mark.parametrize("output", ["You must authenticate before you can call the Kaggle API.",
                                    "401 - Unauthorized", "Could not find kaggle.json. Make sure it is located in ~/.kaggle"])
def test_missing_or_wrong_credentials_get_one_hint_for_both_cli_generations(setup, output):
    competition, run_dir, sub, tmp = setup
    bin_dir = fake_kaggle(tmp / "bin", exit_code=1, output=output)
    proc = submit(competition, sub, bin_dir, run_dir)
    assert proc.returncode == 2 and "save it as ~/.kaggle/access_token (chmod 600)" in proc.stderr
    assert "Kaggle CLIs before 2.0 read ~/.kaggle/kaggle.json" in proc.stderr


def test_without_the_kaggle_cli_it_says_how_to_install_it_before_validating(setup):
    competition, run_dir, sub, tmp = setup
    sub.write_text("not a submission")  # never read: the missing CLI is said first
    env = dict(os.environ, PATH=str(tmp))  # no kaggle on it
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "submit.py"), str(sub), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: the Kaggle CLI is not installed: pip install kaggle (or pip install -e '.[extras]')")


def test_a_cli_that_hangs_is_given_up_on_with_a_sentence(setup):
    competition, run_dir, sub, tmp = setup
    bin_dir = fake_kaggle(tmp / "bin")
    (bin_dir / "kaggle").write_text("#!/bin/sh\nsleep 60\n")
    t0 = time.monotonic()
    proc = submit(competition, sub, bin_dir, run_dir, "--timeout", "1")
    assert proc.returncode == 2 and "did not finish in 1 s" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30
