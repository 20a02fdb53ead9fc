"""Hyperparameter search on Optuna. Any TrainConfig fields, over a space written `NAME=LOW:HIGH`
(`:log` for a log scale) or `NAME=A,B,C` (choices); each trial trains fold 0 of its config and is
scored by that fold's held-out accuracy; a trial whose per-epoch validation accuracy falls below the
median of earlier trials at the same epoch is stopped (Optuna's MedianPruner: the search's early
stopping). The study lives in an Optuna storage, SQLite in the search dir unless a database URL is
given, so a stopped search goes on where it was; several processes (torchrun's ranks, other
machines) share one study in a database server (`--storage postgresql://...`), each running trials
of it. Each trial is an ordinary run dir named by its parameters: a trial stopped mid-way (Ctrl-C)
is asked for again when the search restarts; one whose process died (a kill, a lost machine) stops
beating, and the next process to start a trial asks for it again (Optuna's heartbeat and
RetryHeartbeatStaleTrialCallback). Either way it resumes from its last epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from kaggle_cifar import distributed, plots
from kaggle_cifar.budget import fastest_precision
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import check_named_files
from kaggle_cifar.data import load_train
from kaggle_cifar.errors import ConfigError, RunDirError, TrainingDiverged, first_line
from kaggle_cifar.folds import DeviceTrainSet, fold_split
from kaggle_cifar.model import check_forward
from kaggle_cifar.rundir import SearchDir, folds_table, shown
from kaggle_cifar.train import train_fold

log = logging.getLogger(__name__)

SEARCH_FOLD = 0
FULL_FIT_REFUSED = ("a search scores each trial on fold 0's held-out images; a full fit (--folds 1) would be scored "
                    "on the holdout, which would then be chosen on and estimate nothing: use --folds 2 or more")
# A trial must be an ordinary run of fixed epochs on the competition's own images.
NOT_SEARCHABLE = ("time_budget", "pseudo_labels", "pseudo_threshold", "pseudo_max")
STUDY_NAME = "search"
# Processes that open a new database at once race to make its tables; the losers try again. A loser's
# CREATE fails in one of two ways: it waited on the winner's uncommitted row of the catalog (a unique
# violation), or it checked before the winner committed and created after (the table or the enum type
# "already exists"). PostgreSQL's SQLSTATEs, which do not change with the server's language:
TABLE_ATTEMPTS = 3
LOST_CREATE_RACE = {"23505": "unique_violation", "42P07": "duplicate_table", "42710": "duplicate_object"}
# A running trial's process writes a heartbeat this often; one silent for GRACE_S is taken as dead:
# its trial fails and is asked for again, at most MAX_RETRIES times (a trial that kills its process
# every time, as one out of memory would, is not retried for ever).
HEARTBEAT_S, GRACE_S, MAX_RETRIES = 60, 180, 3
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SHARED_SQLITE_REFUSED = ("several processes on one study need a database server: give every one --storage "
                         "postgresql://USER@HOST/DB (README: \"Several machines (or GPUs), one search\"); SQLite in the "
                         "search dir is for one process")


@dataclass(frozen=True)
class Dimension:
    """One searched field: a range (ints stay ints) or a list of choices."""
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def values_to_check(self) -> tuple:
        return self.choices or (self.low, self.high)


def parse_space(specs: list[str]) -> list[Dimension]:
    """`NAME=LOW:HIGH[:log]` or `NAME=A,B,...` for TrainConfig fields, typed as the fields are."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    space = []
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")

        def bad(why: str) -> ConfigError:
            return ConfigError(f"search space {spec!r}: {why} (write NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=A,B,C)")

        if name not in kinds:
            raise bad(f"{name!r} is not a training config field")
        if name in NOT_SEARCHABLE:
            raise bad(f"{name} cannot be searched")
        if name in {d.name for d in space}:
            raise bad(f"{name} is given twice")
        kind = kinds[name]
        try:
            if "," in values:
                choices = tuple(_typed(kind, v.strip()) for v in values.split(","))
                space.append(Dimension(name, choices=choices))
                continue
            parts = values.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise bad("neither a range nor choices")
            if kind not in (int, float):
                raise bad(f"{name} is not a number: give its choices")
            low, high = _typed(kind, parts[0]), _typed(kind, parts[1])
        except ValueError as e:
            raise bad(str(e)) from None
        if not low < high:
            raise bad("LOW must be below HIGH")
        if len(parts) == 3 and low <= 0:
            raise bad("a log scale needs LOW > 0")
        space.append(Dimension(name, low, high, log=len(parts) == 3))
    if not space:
        raise ConfigError("the search space is empty: give --space NAME=LOW:HIGH ... or --space-file FILE")
    return space


def _typed(kind: type, text: str):
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    return kind(text)


def read_space_file(path: Path) -> list[str]:
    """A space file: one `NAME=...` per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable search space ({e})") from None
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def check_space(base: TrainConfig, space: list[Dimension]) -> None:
    """Every end of every range and every choice makes a valid config with the base: a typo is
    caught before the first trial trains."""
    for dim in space:
        for value in dim.values_to_check():
            try:
                if dataclasses.replace(base, **{dim.name: value}).full_fit:
                    raise ConfigError(FULL_FIT_REFUSED)
            except ConfigError as e:
                raise ConfigError(f"search space {dim.name}={value!r}: {e}") from None
    if base.time_budget or base.pseudo_labels:
        raise ConfigError("a search trains fixed --epochs on the competition's images: "
                          "--time-budget and --pseudo-labels are not for it")


def open_study(base: TrainConfig, space: list[Dimension], search_dir: SearchDir, storage_url: str | None,
               prune: bool) -> optuna.Study:
    """The study, created or loaded, refused if it was made with another base config or space;
    trials of an earlier session that were stopped mid-way are asked for again."""
    url = storage_url or search_dir.study_url
    search_dir.path.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    # A shared study's processes do not share a seed: from one they suggested the same parameters
    # (two processes, 6 trials: 4 distinct).
    sampler = optuna.samplers.TPESampler(seed=None if storage_url else base.seed)
    for attempt in range(TABLE_ATTEMPTS):
        try:
            with optuna_experimental():
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
                study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                            load_if_exists=True, pruner=pruner, sampler=sampler)
            break
        except (SQLAlchemyError, ImportError, ValueError) as e:  # a bad URL, a missing driver, a file that is no database
            if lost_create_race(e) and attempt + 1 < TABLE_ATTEMPTS:  # another process made the tables at
                time.sleep(1.0)  # the same moment: they are there now
                continue
            raise RunDirError(f"{url}: cannot hold the study ({first_line(e)})") from None
    identity = {"base_config": base.to_json(), "space": [dataclasses.asdict(d) for d in space]}
    for key, value in identity.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
        elif study.user_attrs[key] != _json_like(value):
            raise RunDirError(f"{url}: this study was made with another {key.replace('_', ' ')}; "
                              f"use another --run-dir (or --storage), or delete it to start over")
    fail_stale(study)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL and not any(
                o.number > t.number and _params(o) == t.params for o in trials):
            log.info("trial %d was stopped mid-way: asked for again (it resumes from its last epoch)", t.number)
            study.enqueue_trial(t.params, user_attrs={"resumes_trial": t.number})
    return study


def lost_create_race(e: Exception) -> bool:
    """Whether making the study's tables failed because another process made them at the same moment."""
    return isinstance(e, IntegrityError) or getattr(getattr(e, "orig", None), "sqlstate", None) in LOST_CREATE_RACE


@contextlib.contextmanager
def optuna_experimental():
    """Optuna's heartbeat API, experimental since optuna 2.9, without its warning at every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose process stopped beating (GRACE_S); Optuna's callback asks for each again."""
    with optuna_experimental():
        optuna.storages.fail_stale_trials(study)


def retried_trial(trial: optuna.Trial) -> int | None:
    """The number of the stale trial this one asks for again, if it does."""
    frozen = trial.study.get_trials(deepcopy=False)[trial.number]  # (a Trial has no system attributes of its own)
    with optuna_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def _params(trial: optuna.trial.FrozenTrial) -> dict:
    return trial.system_attrs.get("fixed_params", trial.params)  # an enqueued trial's, before it runs


def _json_like(value):
    import json

    return json.loads(json.dumps(value))


def more_to_run(study: optuna.Study, trials: int) -> bool:
    """Whether this process should start another trial toward the study's `trials` finished ones.
    While the trials still owed are running in other processes it waits for them: to end, or to go
    stale (their process died) and be asked for again, which it then runs."""
    while True:
        fail_stale(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(state in FINISHED for state in states)
        running, waiting = states.count(optuna.trial.TrialState.RUNNING), states.count(optuna.trial.TrialState.WAITING)
        if finished >= trials:
            return False
        if waiting or finished + running < trials:
            return True
        time.sleep(HEARTBEAT_S)


def check_storage(world_size: int, storage_url: str | None) -> None:
    """SQLite in the search dir is for one process: more than one needs a database server."""
    if world_size > 1 and not storage_url:
        raise ConfigError(SHARED_SQLITE_REFUSED)


def run_search(base: TrainConfig, space: list[Dimension], input_dir: Path, search_dir: SearchDir, cache_dir: Path,
               ctx: distributed.Context, trials: int, timeout: float | None, storage_url: str | None = None,
               prune: bool = True) -> optuna.Study:
    """Run trials until the study holds `trials` finished ones (complete or pruned; see
    more_to_run) or `timeout` seconds have passed, then write trials.csv, the
    pictures and best_config.json. Under torchrun every rank runs trials of the one study, rank 0
    first reading the images (building the cache) and opening the study."""
    check_storage(ctx.world_size, storage_url)
    check_space(base, space)
    check_named_files(base)
    train = ctx.main_rank_first(lambda: load_train(input_dir, cache_dir, base.folds))
    for cfg in {dataclasses.replace(base, **{dim.name: value}) for dim in space for value in dim.values_to_check()}:
        check_forward(cfg, len(train.labels.classes), train.images.shape[1:3])  # each end of each range
    study = ctx.main_rank_first(lambda: open_study(base, space, search_dir, storage_url, prune))
    policy, worker = ctx.policy, f"pid {os.getpid()} on {socket.gethostname()}"
    labels, on_device = train.labels, DeviceTrainSet.of(train, policy.device)
    if policy.measure_precision:  # measured once, on the base config: every trial trains alike, its time comparable
        policy, _ = fastest_precision(base, on_device.fold(fold_split(base, labels), SEARCH_FOLD), policy)
        policy = dataclasses.replace(policy, measure_precision=False)

    def objective(trial: optuna.Trial) -> float:
        params = {dim.name: dim.suggest(trial) for dim in space}
        try:
            cfg = dataclasses.replace(base, **params)
        except ConfigError as e:  # a combination no single value showed (e.g. freeze_epochs >= epochs)
            trial.set_user_attr("invalid", str(e))
            raise optuna.TrialPruned(str(e)) from None
        run = search_dir.trial(params)
        fold_of = fold_split(cfg, labels)
        run.create(cfg, labels.classes, folds_table(labels.ids, fold_of))
        trial.set_user_attr("run_dir", str(run))
        trial.set_user_attr("worker", worker)
        retried = retried_trial(trial)
        log.info("trial %d: %s%s", trial.number, shown(params), "" if retried is None else
                 f" (trial {retried} again: its process stopped beating; it resumes from its last epoch)")

        reported = [0]  # log rows reported so far: a resumed trial's first call brings all its earlier epochs

        def epoch_end(history: list[dict]) -> None:
            for row in history[reported[0]:]:
                trial.report(row["val_acc"], row["epoch"])
            reported[0] = len(history)
            trial.set_user_attr("epochs", history[-1]["epoch"])
            trial.set_user_attr("seconds", sum(h["seconds"] for h in history))
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {history[-1]['epoch']}: validation accuracy "
                                         f"{history[-1]['val_acc']:.4f}, below the median of earlier trials")

        fold_dir = run.fold(SEARCH_FOLD)
        # Each trial is a new model: past dynamo's recompile limit (8 graphs of one function) the
        # rest of a study would train eagerly, without a word. The compiled graphs start afresh.
        torch.compiler.reset()
        try:
            with run.writer(wait=True):  # another process on these very parameters: its result, not a second training
                result = train_fold(cfg, on_device.fold(fold_of, SEARCH_FOLD), fold_dir, policy, epoch_end=epoch_end)
        except (optuna.TrialPruned, TrainingDiverged) as e:
            trial.set_user_attr("stopped", str(e))
            fold_dir.last.unlink(missing_ok=True)  # a pruned trial never resumes: its checkpoint is dead weight
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("epochs", result["epochs"])
        trial.set_user_attr("seconds", result["seconds"])
        log.info("trial %d: accuracy %.4f after %g epochs", trial.number, result["accuracy"], result["epochs"])
        return result["accuracy"]

    def after_trial(study: optuna.Study, _) -> None:
        write_outputs(study, base, search_dir)
        if not more_to_run(study, trials):
            study.stop()

    logging.getLogger("optuna.study._optimize").addFilter(_without_interrupt_traceback)  # once: the same filter
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "Trial N finished" lines repeat ours
    try:
        if more_to_run(study, trials):
            study.optimize(objective, timeout=timeout, catch=(), callbacks=[after_trial])
    finally:
        optuna.logging.set_verbosity(verbosity)
        write_outputs(study, base, search_dir)
    return study


def _without_interrupt_traceback(record: logging.LogRecord) -> bool:
    """Ctrl-C: the trial is recorded as failed in one line, without optuna's traceback."""
    return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


def write_outputs(study: optuna.Study, base: TrainConfig, search_dir: SearchDir) -> None:
    """trials.csv, the pictures, and best_config.json (the base config with the best trial's
    parameters) once a trial has completed."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    search_dir.write_trials_csv(frame.rename(columns={"value": "accuracy"}))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return
    search_dir.write_best_config(dataclasses.replace(base, **study.best_params))
    if plots.available():
        plots.write_search_pictures(study, search_dir.pictures)


def summary(study: optuna.Study, search_dir: SearchDir) -> str:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    if not any(s == "complete" for s in states):
        return f"search: {counts}; no trial has completed yet"
    best = study.best_trial
    return (f"search: {counts}; best trial {best.number}: accuracy {best.value:.4f} with {shown(best.params)}"
            + f"\nbest config: {search_dir.best_config} (train_folds.py --config {search_dir.best_config})")

