"""Predict the test set with every fold's model and test-time augmentation; the submission CSV goes
to stdout (or --output), written only once every prediction is done and the CSV has been validated.

    python scripts/predict.py > submissions/sub.csv
    python scripts/predict.py --run-dir runs/r1 --ensemble runs/r2 runs/seed1 > submissions/sub.csv
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from kaggle_cifar import cli
from kaggle_cifar.atomic import write_text
from kaggle_cifar.config import PREDICT_BATCH, TTA_GATE


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_io_flags(parser, of_the_run=True)
    cli.add_device_flags(parser)
    parser.add_argument("--tta", default=None,
                        help="test-time views: none (1), flip (2), flip_translate (6), flip_translate_weighted (the 6, "
                             "the untranslated pair weighing as much as the 4 shifted views) (default: the --tta of "
                             "--run-dir's run)")
    parser.add_argument("--tta-gate", type=cli.non_negative, default=TTA_GATE, metavar="GAP",
                        help="add the views one at a time (the untranslated, unflipped one first), each only for "
                             "the images whose mean over the views so far has its top two classes less than GAP "
                             "times the share of the views still to come apart in log-probability; the rest keep "
                             "that mean (default: "
                             f"{TTA_GATE}; 0: every view on every image)")
    parser.add_argument("--ensemble", type=Path, nargs="+", default=[], metavar="RUN_DIR",
                        help="more finished runs (other seeds, models, a pseudo-label round) whose folds join "
                             "--run-dir's in the ensemble, every fold weighing the same")
    parser.add_argument("--weights", choices=["equal", "oof"], default="equal",
                        help="how the runs of an --ensemble weigh: equal (every fold the same) or oof (each run's "
                             "temperature, then its weight, fitted on the runs' out-of-fold predictions by least log "
                             "loss; the runs must share their fold split)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=None,
                        help=f"inference batch size (default: {PREDICT_BATCH}, fewer for runs with a larger "
                             "--image-size: the smallest of their configs' predict_batch)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the CSV to this file (atomically) instead of stdout, and beside it FILE.json: the "
                             "runs, their weights and temperatures (with --weights oof, their OOF accuracies), views and "
                             "gate")
    args = parser.parse_args()
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {args.output} is a folder; give the file to write, e.g. {args.output / 'sub.csv'}")
    from kaggle_cifar import distributed  # after the flags: --help answers without loading torch
    from kaggle_cifar.augment import TTA_VIEWS
    from kaggle_cifar.predict import submission_csv
    from kaggle_cifar.rundir import RunDir
    from kaggle_cifar.submission import record_path

    if args.tta is not None and args.tta not in TTA_VIEWS:
        parser.error(f"--tta {args.tta}: use one of {', '.join(TTA_VIEWS)}")
    cli.inputs_of_the_run(args, RunDir(args.run_dir))
    ctx = distributed.setup(args.device, args.precision, args.compile)
    try:
        cli.resolve_paths(args, ctx)
        made = submission_csv(args.input, [args.run_dir, *args.ensemble], args.cache_dir, ctx, args.tta,
                              args.batch_size, args.tta_gate, args.weights)
    finally:
        distributed.teardown(ctx)
    if made is not None:
        csv, record = made
        if args.output:
            write_text(args.output, csv)
            write_text(record_path(args.output), json.dumps(record, indent=1) + "\n")
        else:
            sys.stdout.write(csv)
        rows = csv.count("\n") - 1
        where = f"wrote {args.output} and its record {record_path(args.output).name}" if args.output else \
            "wrote the submission to stdout"
        print(f"{where}: {rows:,} rows, valid; next: python scripts/submit.py {shlex.quote(str(args.output or 'FILE'))}"
              f"{cli.run_dir_flag(args.run_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
