"""Gated and weighted TTA on a finished run's holdout: its fold ensemble predicts the holdout images
under every view set (as predict does the test images), each with every view on every image, then
with predict's gate at each `--gates` value (`inference.gated_probs`: the views one at a time, each
only for the images whose mean so far has its top two classes under the gate apart), with the views
an image that took.

    python bench/tta_gate.py --run-dir runs/fast-holdout --gates 0.3 0.5 0.7 1.0

Accuracy and speed-up are against the run's own views (its --tta) on every image, what predict does
without a gate; the speed-up is in forward passes. `--test-sample N` also times predict's passes
over N random test images, where the unscored fillers change how many views the gate lets through.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import Table, holdout_of  # bench/common.py, beside this script; first, before torch loads
import numpy as np

from kaggle_cifar import budget, cli, distributed
from kaggle_cifar.augment import TTA_VIEWS
from kaggle_cifar.data import cached_images, test_ids
from kaggle_cifar.device import synchronize
from kaggle_cifar.inference import for_inference, gated_probs, load_fold_models, stream_probs, view_set_probs
from kaggle_cifar.report import accuracy
from kaggle_cifar.rundir import RunDir


def time_test_sample(run: RunDir, cfg, models: list, policy, n: int, gates: list[float]) -> None:
    """Seconds of predict's passes (inference.stream_probs, gated_probs) over `n` random test images,
    each against the run's views on every image, timed in this one run."""
    source = run.source()
    ids = test_ids(source["input"])
    picked = np.sort(np.random.default_rng(0).choice(len(ids), size=min(n, len(ids)), replace=False))
    images = np.asarray(cached_images(Path(source["input"]) / "test", ids, source["cache_dir"])[picked])
    compiled = for_inference(models, policy, len(images) * len(set(TTA_VIEWS[cfg.tta])), cfg.predict_batch)
    stream_probs(compiled, images[:cfg.predict_batch], TTA_VIEWS["none"], policy, cfg.predict_batch)  # compiles, once
    table, every = Table(), None
    for name, gate in [(cfg.tta, None), ("flip", None), *[(name, gate) for gate in gates
                                                            for name in dict.fromkeys(("flip", cfg.tta))]]:
        t0 = time.perf_counter()
        if gate is None:
            stream_probs(compiled, images, TTA_VIEWS[name], policy, cfg.predict_batch)
            passes = len(images) * len(set(TTA_VIEWS[name]))
        else:
            passes = gated_probs(compiled, images, TTA_VIEWS[name], gate, policy, cfg.predict_batch)[1]
        synchronize(policy.device)
        seconds = time.perf_counter() - t0
        every = every or seconds  # the first row: the run's views on every image
        table.add(views=name, gate="-" if gate is None else gate, test_images=f"{len(images):,}",
                  views_per_image=f"{passes / len(images):.2f}", seconds=f"{seconds:.1f}",
                  speedup=f"{every / seconds:.2f}")
    print(f"\n{len(images):,} of the {len(ids):,} test images (seed 0), {policy.describe()}; speed-up against "
          f"{cfg.tta} on every image\n")
    print(table)


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run trained with --holdout")
    parser.add_argument("--gates", type=cli.non_negative, nargs="+", default=[0.3, 0.5, 0.7, 1.0, 1.5],
                        help="values of predict's --tta-gate to score (here 0 gives every image the first view alone; "
                             "predict reads 0 as no gate)")
    parser.add_argument("--test-sample", type=cli.positive_int, default=None, metavar="N",
                        help="also time predict's passes over N test images drawn at random (the unscored fillers "
                             "among them in their share): the run's views on every image, and flip and the run's "
                             "views at each gate")
    cli.add_device_flags(parser)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg, classes = run.read()
    source = run.source()
    holdout, labels = holdout_of(run)
    ctx = distributed.setup(args.device, args.precision, args.compile)
    images = np.asarray(cached_images(Path(source["input"]) / "train", labels.ids, source["cache_dir"])[holdout])
    models = load_fold_models(run, cfg, classes, ctx.policy)
    policy = budget.fastest_for_inference(models, images, ctx.policy)
    ensemble = {name: p.cpu().numpy() for name, p in view_set_probs(models, images, policy, cfg.predict_batch).items()}
    targets = labels.targets[holdout]
    # Every row against the run's own views on every image: what predict does without a gate.
    reference, reference_views = accuracy(ensemble[cfg.tta], targets), len(set(TTA_VIEWS[cfg.tta]))
    table = Table()

    def add(name: str, gate, probs, per_image: float) -> None:
        scored = accuracy(probs, targets)
        table.add(views=name, gate=gate, accuracy=f"{scored:.4f}", points_vs_all=f"{100 * (scored - reference):+.2f}",
                  views_per_image=f"{per_image:.2f}", speedup=f"{reference_views / per_image:.2f}")

    for name, views in TTA_VIEWS.items():
        if name == "none":
            continue
        add(name, "-", ensemble[name], len(set(views)))
        for gate in args.gates:
            probs, passes = gated_probs(models, images, views, gate, policy, cfg.predict_batch)
            add(name, gate, probs.cpu().numpy(), passes / len(images))
    if args.test_sample:
        time_test_sample(run, cfg, models, policy, args.test_sample, args.gates)
    print(f"\n{run.path}: {len(models)} fold model(s), {len(targets):,} holdout images, {policy.precision}; "
          f"TTA none alone {accuracy(ensemble['none'], targets):.4f}; points and speed-up against {cfg.tta} "
          f"({reference_views} views) on every image\n")
    print(table)
    return 0


if __name__ == "__main__":
    cli.run(main)
