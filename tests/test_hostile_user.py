"""What a hostile but realistic user does: swapped images under a warm cache, typos, a full disk,
Ctrl-C, odd flags. Each gets one plain line (exit 2, or 130 when interrupted), never a traceback,
and nothing finished is lost."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, call_script, make_competition
from kaggle_cifar import checkpoint, cli, data, distributed
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import train_folds
from kaggle_cifar.errors import CheckpointError, InputError

CPU = distributed.setup("cpu", "float32")  # as conftest.one_precision makes every run


@pytest.fixture
def small(tmp_path):
    return make_competition(tmp_path / "input", per_class=6, n_test=6)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: " if code == 2 else "interrupted: ")
    return last


@pytest.mark.parametrize("parse, text", [
    ("positive_int", "0"), ("positive_int", "1.5"), ("non_negative", "-0.1"), ("non_negative", "nan"),
    ("non_negative", "inf"), ("duration", "0m"), ("duration", "inf"), ("duration", "1h30"), ("duration", "-5")])
def test_a_number_flag_names_the_text_it_refuses_and_what_it_takes(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text)) + " is not (a whole|a finite|a duration)"):
        getattr(cli, parse)(text)


def test_number_flags_take_what_they_say():
    assert (cli.positive_int("3"), cli.non_negative("0"), cli.duration("1h30m"), cli.duration("90")) == (3, 0, 5400, 90)


def test_a_warm_cache_never_serves_pixels_that_are_not_in_the_files(small):
    ids = np.arange(1, 7)
    folder, cache = small / "test", small / ".cache"
    first = data.cached_images(folder, ids, cache).copy()
    built = (cache / "test.npy").stat().st_mtime_ns
    np.testing.assert_array_equal(data.cached_images(folder, ids, cache), first)
    assert (cache / "test.npy").stat().st_mtime_ns == built  # unchanged files: the cache is reused

    os.rename(folder / "1.png", folder / "tmp.png")  # swap two images
    os.rename(folder / "4.png", folder / "1.png")
    os.rename(folder / "tmp.png", folder / "4.png")
    swapped = data.cached_images(folder, ids, cache)
    np.testing.assert_array_equal(swapped[0], first[3])
    np.testing.assert_array_equal(swapped[3], first[0])

    # Same size (uncompressed PNGs of one shape), same inode, and the old mtime put back.
    for i, value in ((2, 10), (3, 200)):
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(folder / f"{i}.png", compress_level=0)
    old = (folder / "2.png").stat()
    data.cached_images(folder, ids, cache)
    replacement = (folder / "3.png").read_bytes()
    assert len(replacement) == old.st_size
    with open(folder / "2.png", "r+b") as f:
        f.write(replacement)
    os.utime(folder / "2.png", ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (folder / "2.png").stat().st_size == old.st_size and (folder / "2.png").stat().st_ino == old.st_ino
    assert (data.cached_images(folder, ids, cache)[1] == 200).all()


def test_a_typo_is_refused_before_the_run_dir_is_written_and_the_fixed_command_runs(small, tmp_path):
    run = tmp_path / "run"
    flags = ["--input", str(small), "--run-dir", str(run), *TINY[:4], "--epochs", "1"]
    last = one_error_line(call_script("train_folds.py", *flags, "--arch", "resnet18_cifra", check=False))
    assert "arch must be resnet18_cifar or fast_cifar or" in last and "(did you mean resnet18_cifar" in last
    last = one_error_line(call_script("train_folds.py", *flags, "--pseudo-labels", str(tmp_path / "fisrt"), check=False))
    assert "--pseudo-labels" in last and "no such run dir" in last
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 1.5}))
    last = one_error_line(call_script("train_folds.py", *flags, "--config", str(bad), check=False))
    assert "bad.json" in last and "epochs must be a whole number, not 1.5" in last
    bad.write_text(json.dumps({"lr": "0.2"}))
    assert "lr must be float, not '0.2'" in one_error_line(call_script("train_folds.py", *flags, "--config", str(bad),
                                                                       check=False))
    assert not run.exists()
    call_script("train_folds.py", *flags)
    assert (run / "report.json").exists()


def test_a_run_dir_whose_folds_never_started_takes_a_new_config(small, tmp_path):
    from kaggle_cifar.rundir import RunDir

    RunDir(tmp_path / "run").create(TrainConfig(epochs=9), ["x"], "id,fold\n")  # stopped before its first fold
    train_folds(TrainConfig(folds=2, epochs=1, width=4, batch_size=4), small, tmp_path / "run", small / ".cache", CPU)
    assert TrainConfig.from_json(tmp_path / "run" / "config.json").epochs == 1


def test_a_reader_of_the_csv_that_goes_early_ends_the_script_in_silence_and_another_broken_pipe_is_named(capsys):
    code = ("import sys, time\nfrom kaggle_cifar import cli\n"
            "def main():\n    sys.stdout.write('id,label\\n'); sys.stdout.flush(); time.sleep(0.5)\n"
            "    sys.stdout.write('1,cat\\n' * 100_000)\n    return 0\ncli.run(main)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT) as proc:
        assert proc.stdout.readline() == b"id,label\n"
        proc.stdout.close()  # as `predict.py | head -1` does
        assert proc.wait(60) == 141 and proc.stderr.read() == b""  # no error line, no "Exception ignored"

    def fails():  # a pipe that is not standard output's (a worker's, a tool's)
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(SystemExit) as exit_:
        cli.run(fails)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: [Errno 32] Broken pipe\n"


def test_every_script_that_reads_a_run_names_a_path_that_holds_none(small, tmp_path):
    """Not the input it would otherwise look for in ./input: the run dir given is what is wrong."""
    missing, empty = tmp_path / "runn", tmp_path / "empty"
    empty.mkdir()
    for script, flag in [("predict.py", "--run-dir"), ("report.py", "--run-dir"), ("report.py", "--compare")]:
        last = one_error_line(call_script(script, flag, str(missing), check=False))
        assert last == f"error: {missing}: no such run dir (train_folds.py --run-dir {missing} trains one)", script
        last = one_error_line(call_script(script, flag, str(empty), check=False))
        assert last == f"error: {empty / 'config.json'}: missing; {empty} is not a training run (run train_folds.py)"
    sub = tmp_path / "sub.csv"  # named before the Kaggle CLI is looked for
    assert one_error_line(call_script("submit.py", str(sub), check=False)) == \
        f"error: {sub}: no such file, not a submission CSV (see submit.py --help)"


@pytest.mark.parametrize("case", ["run dir is a file", "predict batch size 0", "output is a folder",
                                  "run without classes.json", "prepare without py7zr", "more folds than images"])
def test_what_used_to_be_a_traceback_is_one_error_line(case, small, tmp_path):
    run = tmp_path / "run"
    if case == "run dir is a file":
        run.write_text("not a folder")
        proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(run), *TINY, check=False)
        assert "is a file, not a run dir" in one_error_line(proc)
        return
    if case == "more folds than images":
        proc = call_script("train_folds.py", "--input", str(small), "--run-dir", str(run), "--folds", "50", check=False)
        assert "--folds 50: 3 of the 3 classes" in one_error_line(proc) and "use --folds 6 or fewer" in proc.stderr
        return
    if case == "prepare without py7zr":
        raw = tmp_path / "raw"
        raw.mkdir()
        (raw / "trainLabels.csv").write_text("id,label\n1,cat\n")
        (raw / "train.7z").write_bytes(b"7z")
        blocked = tmp_path / "blocked" / "py7zr"
        blocked.mkdir(parents=True)
        (blocked / "__init__.py").write_text("raise ImportError('py7zr is not installed')\n")
        env = dict(os.environ, PYTHONPATH=str(blocked.parent))
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare.py"), "--input", str(raw)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert "needs py7zr: pip install py7zr" in one_error_line(proc)
        return
    train_folds(TrainConfig(folds=2, epochs=1, width=4, batch_size=4), small, run, small / ".cache", CPU)
    args = ["--input", str(small), "--run-dir", str(run)]
    if case == "predict batch size 0":
        assert "--batch-size: '0' is not a whole number of at least 1" in one_error_line(
            call_script("predict.py", *args, "--batch-size", "0", check=False))
        assert "--tta-gate: '-1' is not a finite number of at least 0" in one_error_line(
            call_script("predict.py", *args, "--tta-gate", "-1", check=False))
    elif case == "output is a folder":
        assert "is a folder" in one_error_line(call_script("predict.py", *args, "--output", str(tmp_path), check=False))
    else:
        (run / "classes.json").unlink()
        assert "classes.json: missing" in one_error_line(call_script("predict.py", *args, check=False))


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1430")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"last\.pt: could not be written .* MiB free on its disk; the previous"):
        checkpoint.save(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_a_full_disk_under_the_cache_is_named_before_decoding(small, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(InputError, match=r"\.cache: no room for the decoded images .* MiB free"):
        data.cached_images(small / "test", np.arange(1, 7), small / ".cache")
    assert not (small / ".cache" / "test.npy").exists()


def interrupt_when(cmd: list[str], ready) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    # Ctrl-C's default action in the child, as in a terminal: a suite started in the background by a
    # shell without job control inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ctrl_c_says_what_was_kept_and_the_same_command_resumes(small, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_folds.py"), "--input", str(small), "--run-dir", str(run),
           "--folds", "2", "--epochs", "40", "--width", "4", "--batch-size", "4"]
    proc = interrupt_when(cmd, lambda: (run / "fold0" / "last.pt").exists())
    assert "run the same command again to resume" in one_error_line(proc, code=130)
    epoch = torch.load(run / "fold0" / "last.pt", weights_only=True)["epoch"]
    assert epoch < 39
    proc = call_script("train_folds.py", *cmd[2:])
    assert f"fold 0: resuming after epoch {epoch + 1}" in proc.stderr and (run / "report.json").exists()


def test_ctrl_c_in_any_script_is_one_line_and_exit_130(capsys):
    from kaggle_cifar import cli

    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted: nothing was written"


def test_an_error_whose_text_spans_lines_is_still_one_error_line(capsys):
    from kaggle_cifar import cli

    def main():
        raise InputError("input/trainLabels.csv: not a readable CSV (Error tokenizing data.\n  C error: saw 3)\n")

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: input/trainLabels.csv: not a readable CSV (Error tokenizing data. C error: saw 3)\n"


def test_another_librarys_message_is_quoted_as_one_plain_line():
    from kaggle_cifar.errors import first_line

    torch_like = RuntimeError("\n  Weights only load failed, \x1b[1mdo those steps only if you trust it\x1b[0m.\n\t(1) ...")
    assert first_line(torch_like) == "Weights only load failed, do those steps only if you trust it."  # no escapes
    assert first_line(ValueError(""), typed=True) == "ValueError"


def test_truncated_resume_state_says_what_to_do(small, tmp_path):
    cfg = TrainConfig(folds=2, epochs=2, width=4, batch_size=4)
    train_folds(cfg, small, tmp_path / "run", small / ".cache", CPU)
    last = tmp_path / "run" / "fold1" / "last.pt"
    (tmp_path / "run" / "fold1" / "result.json").unlink()
    last.write_bytes(last.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable checkpoint .*; delete it to train fold 1 again"):
        train_folds(cfg, small, tmp_path / "run", small / ".cache", CPU)


def test_an_empty_label_in_a_submission_is_named_by_row(small, tmp_path):
    sub = tmp_path / "sub.csv"
    sub.write_text("id,label\n1,cat\n2,\n3,dog\n4,cat\n5,cat\n6,frog\n")
    proc = subprocess.run([sys.executable, "-m", "kaggle_cifar.submission", "check", str(sub), "--input", str(small)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "empty label on row(s) 3" in proc.stderr


def test_a_class_far_smaller_than_the_others_is_warned_about(tmp_path, caplog):
    competition = make_competition(tmp_path / "input", per_class=40, n_test=3)
    labels = (competition / "trainLabels.csv").read_text().splitlines()
    labels[1:4] = [f"{line.split(',')[0]},dgo" for line in labels[1:4]]
    (competition / "trainLabels.csv").write_text("\n".join(labels) + "\n")
    with caplog.at_level("WARNING"):
        data.load_train(competition, competition / ".cache", folds=2)
    assert "'dgo' (3 image(s): ids" in caplog.text and "a typo in the labels?" in caplog.text


def test_a_second_writer_of_a_run_dir_is_refused_naming_the_holder_and_a_dead_ones_lock_is_free(small, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(  # a training of the run dir, stopped where it holds the writer's lock
        [sys.executable, "-c", "import sys; from kaggle_cifar.rundir import RunDir\n"
                               f"with RunDir({str(run)!r}).writer():\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        flags = ["--input", str(small), "--run-dir", str(run), *TINY[:4], "--epochs", "1"]
        last = one_error_line(call_script("train_folds.py", *flags, check=False))
        assert last.startswith(f"error: {run}: pid {holder.pid} on ") and "is training this run dir" in last
        assert not (run / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # dies holding the lock, as a crashed training does
        holder.wait()
    call_script("train_folds.py", *flags)
    assert (run / "report.json").exists()


def test_a_damaged_file_of_a_run_dir_is_named_with_the_way_to_write_it_again(small, tmp_path):
    run = tmp_path / "run"
    flags = ["--input", str(small), "--run-dir", str(run), *TINY[:4], "--epochs", "1"]
    call_script("train_folds.py", *flags)
    report = run / "report.json"
    report.write_text(report.read_text()[:40])  # truncated
    last = one_error_line(call_script("report.py", str(run), check=False))
    assert last.startswith(f"error: {report}: unreadable (JSONDecodeError: ") and "run train_folds.py on this" in last
    result = run / "fold1" / "result.json"
    result.write_text("{")
    last = one_error_line(call_script("train_folds.py", *flags, check=False))
    assert last.startswith(f"error: {result}: unreadable") and f"delete {result} and run train_folds.py" in last
    result.unlink()  # as the line says
    call_script("train_folds.py", "--config", str(run / "config.json"), "--input", str(small), "--run-dir", str(run))
    assert json.loads(result.read_text())["fold"] == 1 and json.loads(report.read_text())["cv_accuracy"] > 0
