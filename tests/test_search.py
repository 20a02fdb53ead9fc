"""Hyperparameter search: the space as written, trials that resume and prune, the best config."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
import torch

from conftest import ROOT, call_script, hooked_pythonpath, make_competition, run_script, torchrun
from kaggle_cifar import search as search_module
from kaggle_cifar import train
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.device import Policy
from kaggle_cifar.distributed import Context
from kaggle_cifar.errors import ConfigError, RunDirError
from kaggle_cifar.rundir import SearchDir
from kaggle_cifar.search import Dimension, check_space, open_study, parse_space, run_search

CPU = Policy.of(torch.device("cpu"), "float32")  # as conftest.one_precision makes every run
ALONE = Context(0, 1, CPU)  # one process: no torchrun

BASE = TrainConfig(folds=2, epochs=3, width=8, batch_size=8)


def test_the_space_is_read_as_written_and_typed_as_the_fields():
    assert parse_space(["lr=0.01:1:log", "width=8:32", "optimizer=sgd,adamw", "decay-norm-and-bias=true,false"]) == [
        Dimension("lr", 0.01, 1.0, log=True), Dimension("width", 8, 32),
        Dimension("optimizer", choices=("sgd", "adamw")), Dimension("decay_norm_and_bias", choices=(True, False))]
    for spec, why in [("nope=1:2", "'nope' is not a training config field"), ("time_budget=1,2", "cannot be searched"),
                      ("lr=1:0.1", "LOW must be below HIGH"), ("lr=0:1:log", "needs LOW > 0"), ("lr=0.1", "neither"),
                      ("width=8.5:16", "invalid literal"), ("optimizer=a:b", "not a number")]:
        with pytest.raises(ConfigError, match=why):
            parse_space([spec])
    with pytest.raises(ConfigError, match=r"search space optimizer='nadamm': invalid config: optimizer must be"):
        check_space(BASE, parse_space(["optimizer=sgd,nadamm"]))
    with pytest.raises(ConfigError, match=r"search space label_smoothing=1.0: .*label_smoothing must be in \[0, 1\)"):
        check_space(BASE, parse_space(["label_smoothing=0:1"]))


@pytest.fixture
def tiny(tmp_path):
    return make_competition(tmp_path / "input", per_class=10, n_test=3)


def search(tiny, where, trials, space=("lr=0.01:0.3:log", "label_smoothing=0:0.2"), prune=True):
    return run_search(BASE, parse_space(list(space)), tiny, SearchDir(where), tiny / ".cache", ALONE, trials,
                      None, prune=prune)


def test_a_stopped_trial_resumes_from_its_last_epoch_when_the_search_goes_on(tiny, tmp_path, monkeypatch, caplog):
    calls, real_augment = {"n": 0}, train.augment
    steps = 15 // BASE.batch_size  # fold 0 trains on the other fold's 15 images: 1 step an epoch

    def crash_in_epoch_2_of_trial_1(*args):
        calls["n"] += 1
        if calls["n"] == 3 * steps + 1 * steps + 1:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real_augment(*args)

    monkeypatch.setattr(train, "augment", crash_in_epoch_2_of_trial_1)
    with pytest.raises(KeyboardInterrupt):
        search(tiny, tmp_path / "s", trials=3)
    monkeypatch.setattr(train, "augment", real_augment)
    study = optuna.load_study(study_name="search", storage=SearchDir(tmp_path / "s").study_url)
    stopped = study.trials[1]
    assert stopped.state == optuna.trial.TrialState.FAIL
    with caplog.at_level(logging.INFO):
        study = search(tiny, tmp_path / "s", trials=3)
    resumed = [t for t in study.trials if t.user_attrs.get("resumes_trial") == 1]
    assert len(resumed) == 1 and resumed[0].params == stopped.params and resumed[0].state.name == "COMPLETE"
    assert "fold 0: resuming after epoch 1" in caplog.text
    assert resumed[0].intermediate_values.keys() == {1, 2, 3}
    straight = run_search(BASE, [Dimension(k, choices=(v,)) for k, v in stopped.params.items()], tiny,
                          SearchDir(tmp_path / "straight"), tiny / ".cache", ALONE, 1, None)
    assert straight.trials[0].value == resumed[0].value


def test_a_hopeless_trial_is_pruned_and_its_checkpoint_dropped(tiny, tmp_path):
    where = SearchDir(tmp_path / "s")
    where.path.mkdir()
    study = optuna.create_study(storage=where.study_url, study_name="search", direction="maximize")
    for lr in (0.1, 0.1, 0.1, 1e-6):  # three to set the median, then one that cannot learn in three epochs
        study.enqueue_trial({"lr": lr})
    study = search(tiny, where.path, trials=4, space=("lr=0.000001,0.1",))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"]
    assert "below the median of earlier trials" in study.trials[3].user_attrs["stopped"]
    run = where.trial({"lr": 1e-6})
    assert (run.fold(0).path / "log.csv").exists() and not run.fold(0).last.exists()


def test_search_writes_trials_pictures_and_a_best_config_and_goes_on(tiny, tmp_path):
    where = tmp_path / "s"
    args = ["--input", str(tiny), "--run-dir", str(where), "--space", "lr=0.01:0.3:log", "optimizer=sgd,adamw",
            "--folds", "2", "--epochs", "2", "--width", "8", "--batch-size", "8", "--trials"]
    proc = run_script("search.py", *args, "2")
    assert "best trial" in proc.stderr and "Trial 0 finished" not in proc.stderr  # optuna's lines repeat ours
    assert not re.search(r"lr=0\.\d{6,}", proc.stderr)  # values as a person reads them
    trial_dirs = sorted(p.name for p in (where / "trials").iterdir())
    assert len(trial_dirs) == 2 and all(re.fullmatch(r"lr=0\.0*[1-9]\d{0,3}_optimizer=(sgd|adamw)-[0-9a-f]{6}", d)
                                        for d in trial_dirs), trial_dirs  # named by their parameters
    trials = pd.read_csv(where / "trials.csv")
    assert len(trials) == 2 and {"params_lr", "params_optimizer", "accuracy", "user_attrs_epochs",
                                 "user_attrs_seconds", "state"} <= set(trials.columns)
    best = TrainConfig.from_json(where / "best_config.json")
    top = trials.loc[trials["accuracy"].idxmax()]  # the first of equals, as optuna takes it
    assert best == dataclasses.replace(TrainConfig(folds=2, epochs=2, width=8, batch_size=8), lr=top["params_lr"],
                                       optimizer=top["params_optimizer"])
    assert (where / "report" / "history.png").stat().st_size > 0 and (where / "report" / "slices.png").exists()
    call_script("search.py", *args, "3")
    assert len(pd.read_csv(where / "trials.csv")) == 3  # the same study, one trial more
    bad = call_script("search.py", *args, "3", "--storage", "nosuchdb://x", check=False)
    first, *_, last = bad.stderr.splitlines()
    assert bad.returncode == 2 and last.startswith("error: nosuchdb://x: cannot hold the study")
    assert first.startswith("device cpu (") and "training eager" in first  # how it computes, said first


def test_a_study_is_refused_to_another_base_config_or_space(tmp_path):
    space = parse_space(["lr=0.01:0.3:log"])
    open_study(BASE, space, SearchDir(tmp_path), None, prune=True)
    with pytest.raises(RunDirError, match="this study was made with another base config"):
        open_study(dataclasses.replace(BASE, epochs=4), space, SearchDir(tmp_path), None, prune=True)
    with pytest.raises(RunDirError, match="this study was made with another space"):
        open_study(BASE, parse_space(["lr=0.01:0.5:log"]), SearchDir(tmp_path), None, prune=True)


@pytest.mark.parametrize("base, space", [(dataclasses.replace(BASE, folds=1), ["lr=0.01:0.3:log"]),
                                         (BASE, ["folds=1,3"])])
def test_a_search_refuses_a_full_fit_which_has_no_fold_to_score_trials_on(base, space):
    with pytest.raises(ConfigError, match=r"a full fit \(--folds 1\) would be scored on the holdout"):
        check_space(base, parse_space(space))


@pytest.mark.parametrize("spec, why", [("lr=0.01:inf", r"search space lr=inf: invalid config: lr must be a finite number"),
                                       ("warmup=0.1:nan", "LOW must be below HIGH")])
def test_a_range_end_that_cannot_be_right_is_refused_before_the_study(spec, why):
    with pytest.raises(ConfigError, match=why):
        check_space(BASE, parse_space([spec]))


def test_every_trial_of_a_compiled_search_trains_compiled_past_dynamos_recompile_limit(tiny, tmp_path, monkeypatch):
    """A new model each trial recompiles the same forward function; past the limit (8; 2 here, a
    trial's training step and its final predictions) dynamo runs the rest eagerly, silently."""
    compiled, real_compile = [], torch.compile

    def counting(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": counting,
                                                                                     "options": None}))
    compiling = Context(0, 1, dataclasses.replace(CPU, compile=True))
    per_trial = []
    real_train_fold = search_module.train_fold

    def counted(*args, **kwargs):
        before = len(compiled)
        result = real_train_fold(*args, **kwargs)
        per_trial.append(len(compiled) - before)
        return result

    monkeypatch.setattr(search_module, "train_fold", counted)
    cfg = dataclasses.replace(BASE, epochs=1)
    run_search(cfg, parse_space(["width=4,8,12", "lr=0.01:0.3:log"]), tiny, SearchDir(tmp_path / "s"), tiny / ".cache", compiling, 3, None,
               prune=False)
    assert len(per_trial) == 3 and all(n >= 1 for n in per_trial), per_trial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the module's own (Debian's postgresql package, which .ci/run installs)
    on the loopback address; yields a function making an empty database, which returns its URL."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql; .ci/run installs it)")
    import psycopg  # the driver SQLAlchemy's postgresql:// URLs use (in the test extras)

    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # the server refuses root
    home, port = Path(tempfile.mkdtemp(prefix="kaggle-cifar-postgres-")), free_port()
    if as_postgres:
        shutil.chown(home, "postgres")
    pg_ctl = [*as_postgres, str(Path(initdb).parent / "pg_ctl"), "-D", str(home / "data")]
    subprocess.run([*as_postgres, initdb, "-D", str(home / "data"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*pg_ctl, "-l", str(home / "server.log"), "-w", "-o", f"-p {port} -k {home} -h 127.0.0.1", "start"],
                   check=True, capture_output=True)

    def database(name: str) -> str:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


# Every search process of the tests below heartbeats every second and takes a trial 2 s silent as
# dead (60 s and 180 s in use); with KILL_AT_TRIAL=N it kills itself (SIGKILL, as the OOM killer or
# a lost machine would) as its Nth trial starts epoch 3.
SEARCH_PATCHES = {"kaggle_cifar.search": "module.HEARTBEAT_S, module.GRACE_S = 1, 2", "kaggle_cifar.train": """
if os.environ.get("KILL_AT_TRIAL"):
    real, started = module.train_one_epoch, [0]

    def train_one_epoch(t, cfg, data, epoch, *rest, **kwargs):
        started[0] += epoch == 0
        if started[0] == int(os.environ["KILL_AT_TRIAL"]) and epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(t, cfg, data, epoch, *rest, **kwargs)

    module.train_one_epoch = train_one_epoch
"""}
SEARCH_FLAGS = ["--space", "lr=0.01:0.3:log", "--no-prune", "--folds", "2", "--epochs", "4", "--width", "8",
                "--batch-size", "8"]


def search_env(tmp_path: Path, **extra: str) -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                PYTHONPATH=hooked_pythonpath(tmp_path / "hook", SEARCH_PATCHES), **extra)


def check_study(url: str, search_dir: Path, trials: int) -> list[optuna.trial.FrozenTrial]:
    """The study holds `trials` finished trials, none of them run twice, and best_config.json is its
    best; returns the finished trials."""
    study = optuna.load_study(study_name="search", storage=url)
    finished = [t for t in study.trials if t.state in search_module.FINISHED]
    assert len(finished) == trials, [t.state.name for t in study.trials]
    assert len({t.params["lr"] for t in finished}) == trials  # none run twice
    for t in finished:  # each trained its epochs once, in order
        assert list(pd.read_csv(Path(t.user_attrs["run_dir"]) / "fold0" / "log.csv")["epoch"]) == [1, 2, 3, 4]
    best = TrainConfig.from_json(search_dir / "best_config.json")
    assert best == dataclasses.replace(TrainConfig(folds=2, epochs=4, width=8, batch_size=8), **study.best_params)
    return finished


def test_two_search_processes_share_one_postgresql_study_and_a_killed_ones_trial_resumes(postgres, tiny, tmp_path):
    url = postgres("two_processes")
    args = [sys.executable, str(ROOT / "scripts" / "search.py"), "--input", str(tiny), "--run-dir", str(tmp_path / "s"),
            "--storage", url, "--trials", "6", *SEARCH_FLAGS]
    killed = subprocess.Popen(args, env=search_env(tmp_path, KILL_AT_TRIAL="2"), cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    survivor = subprocess.Popen(args, env=search_env(tmp_path), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    (_, killed_log), (_, survivor_log) = killed.communicate(timeout=600), survivor.communicate(timeout=600)
    assert (killed.returncode, survivor.returncode) == (-9, 0), killed_log[-3000:] + survivor_log[-3000:]
    finished = check_study(url, tmp_path / "s", trials=6)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes ran trials of the one study
    study = optuna.load_study(study_name="search", storage=url)
    dead = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(dead) == 1  # the killed process's second trial, failed once its heartbeat stopped...
    again = [t for t in finished if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(again) == 1 and again[0].params == dead[0].params  # ...asked for again by the survivor...
    assert re.search(rf"trial {again[0].number}: .*\(trial {dead[0].number} again: its process stopped beating",
                     survivor_log)
    assert re.search(r"fold 0: resuming after epoch [12] from", survivor_log)  # ...and resumed from its checkpoint
    assert len(study.trials) == 7  # 6 finished (one the retry) and the failed one: nothing asked for in vain


# SQLAlchemy makes optuna's tables in one transaction: it checks which tables exist, then, type by
# type, checks for and creates the enum types, then creates the tables. Another process committing
# the lot just before the first type's check leaves this one to create "studies", which then exists;
# just before the first type's creation, to create a type that then exists.
@pytest.mark.parametrize("moment, error", [("SELECT pg_catalog.pg_type", "DuplicateTable"),
                                           ("CREATE TYPE", "DuplicateObject")])
def test_a_process_that_finds_the_study_tables_made_by_another_between_its_check_and_its_create_opens_the_study(
        postgres, tmp_path, moment, error):
    """Two search processes opening one new database race to make its tables. The race is made certain
    here: the other process's tables are made and committed as this one sends `moment`'s statement."""
    url, raced = postgres(error.lower()), []

    def other_process_makes_the_tables(conn, cursor, statement, *_):
        if statement.lstrip().startswith(moment) and not raced:
            raced.append(statement)
            optuna.storages.RDBStorage(url)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", other_process_makes_the_tables)
    try:  # without trying again, open_study fails with PostgreSQL's `error`
        study = open_study(BASE, parse_space(["lr=0.01:0.3:log"]), SearchDir(tmp_path / "s"), url, prune=False)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", other_process_makes_the_tables)
    assert raced, f"open_study sent no {moment}"
    assert study.user_attrs["base_config"] == BASE.to_json()
    assert optuna.load_study(study_name="search", storage=url).user_attrs["base_config"] == BASE.to_json()


def test_under_torchrun_every_rank_runs_trials_of_one_study_and_rank_0_alone_decodes(postgres, tiny, tmp_path):
    url = postgres("torchrun")
    args = ["--input", str(tiny), "--run-dir", str(tmp_path / "s"), "--storage", url, "--trials", "4", *SEARCH_FLAGS]
    proc = torchrun("search.py", *args, env=search_env(tmp_path))
    assert proc.stderr.count("decoded 30 images") == 1  # rank 0 built the cache; rank 1 read it
    finished = check_study(url, tmp_path / "s", trials=4)
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    refused = torchrun("search.py", *args[:4], *args[6:], env=search_env(tmp_path), check=False)
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "error: several processes on one study need a database server" in refused.stderr, refused.stderr[-3000:]
    assert "device cpu" not in refused.stderr  # refused before the ranks joined (and waited on) each other
