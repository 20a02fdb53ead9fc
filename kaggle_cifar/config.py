"""Every training hyperparameter in one frozen dataclass; argparse flags are generated from it.

The resolved config is saved as `config.json` in each run dir: it is the run's identity (a run dir
made with other settings is refused) and `--config FILE` re-runs it, with CLI flags overriding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_cifar.errors import ConfigError, first_line


def parse_duration(text: str) -> float:
    """Seconds in "900", "900s", "15m", "2h", "1h30m" or "1h30m20s" (--time-budget). A number
    without its unit after hours or minutes ("1h30") is refused: 30 minutes or 30 seconds?"""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*(s?))?\s*",
                         text)
    if not text.strip() or parts is None or not any(parts.groups()[:3]):
        raise ConfigError(f"time_budget {text!r}: give seconds, or a duration such as 15m, 2h or 1h30m")
    hours, minutes, seconds, unit = parts.groups()
    if seconds and not unit and (hours or minutes):
        raise ConfigError(f"time_budget {text!r}: {seconds} of what? Give its unit, e.g. "
                          f"{text.strip()}{'m' if not minutes else 's'}")
    return sum(float(p) * scale for p, scale in ((hours, 3600), (minutes, 60), (seconds, 1)) if p)


PREDICT_BATCH = 2048  # images per forward pass when predicting (predict's --batch-size)
# predict's --tta-gate: each view after the plain one only for the images whose mean over the views
# so far has its top two classes less than this times the share of the views still to come apart in
# log-probability (inference.gated_probs). On four fast-recipe holdouts (8 and 10 epochs; Mixup,
# label smoothing 0.2 or reflected crops in three of them) it scored within 0.08 points of every view
# on every image, with 2.4-2.7x fewer forward passes over random test images, the unscored fillers
# among them (bench/RESULTS.md).
TTA_GATE = 1.1
PRECISIONS = ("auto", "bf16", "float32")  # --precision: how device.Policy.of reads each


def human_duration(seconds: float) -> str:
    """`2 d 4 h`, `3 h 12 min`, `14 min`, `45 s`: a duration as a person reads it."""
    minutes = round(seconds / 60)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // 1440} d {minutes % 1440 // 60} h"


def _opt(default, help):
    return field(default=default, metadata={"help": help})


# Named sets of TrainConfig values (--recipe NAME); flags given beside a recipe override it. The
# evidence for each is in bench/RESULTS.md.
RECIPES = {
    # The defaults: 5 folds x 30 epochs of the CIFAR-stem ResNet18 at width 64 with Muon and the
    # flip_translate TTA: the fold ensemble and CV of the standard recipe, for a GPU and hours.
    "resnet18": {},
    # One model on every training image (a full fit), airbench's network and its 2-pixel
    # translations: 0.8954 and 0.9018 on a 5,000-image holdout in 36 min on a 2-core CPU, 0.892 and
    # 0.903 on the scored test images in 20 min on one core: of these recipes the most accuracy per
    # minute for budgets under about 9 epochs of fast_wide. Not ahead of airbench94_muon's own
    # recipe: ported to the CPU unchanged it scored 0.907 in bf16 in those 20 min (7.7 epochs).
    "fast": {"folds": 1, "arch": "fast_cifar", "width": 64, "crop_pad": 2},
    # fast at width 96: half its images/s. At 10 epochs 0.9109 on the holdout (three seeds, 0.20
    # apart), where fast has stopped gaining (0.9078 at 12, 0.9082 at 16 in 80% of that time): level
    # or ahead for long budgets; behind it when short (4 epochs: 0.8962, fast 0.903 at 8 in that time).
    # Label smoothing 0.2: against 0.1 on the same three seeds at 10 epochs -0.08, +0.38, +0.48.
    "fast_wide": {"folds": 1, "arch": "fast_cifar", "width": 96, "crop_pad": 2, "label_smoothing": 0.2},
}


# Accuracy by epochs trained on the full competition, with the flip_translate TTA, for choosing a
# recipe under --time-budget; a recipe not measured is not chosen. fast: 5 and 7 epochs, the scored
# test images (the project's scoring, Intel Xeon, one core, 20 minutes); 6 epochs, the mean of two
# seeds on a 5,000-image holdout (AMD EPYC Zen 3); 4, 8 and 12 epochs, one seed on that holdout
# (AMD EPYC Zen 4); 10 epochs, one seed on it (AMD EPYC Zen 3, float32); 16 epochs, one seed on it
# (Intel Xeon). fast_wide: 4 epochs, one seed (AMD EPYC Zen 4; label smoothing 0.1, which at 3
# epochs of fast measured level with 0.2), and 10, the mean of three seeds (Intel Xeon), on that
# holdout; bench/RESULTS.md.
# resnet18 (5 folds of width 64): not measured on the full data.
LEARNING_CURVES = {"fast": {4: 0.8856, 5: 0.892, 6: 0.8986, 7: 0.903, 8: 0.903, 10: 0.9048, 12: 0.9078, 16: 0.9082},
                   "fast_wide": {4: 0.8962, 10: 0.9109}, "resnet18": {}}


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = _opt("", "a named set of the values below, recorded in config.json: resnet18 (the defaults: 5 "
                           "folds x 30 epochs, for a GPU and hours), fast (a full fit of fast_cifar with 2-pixel "
                           "crops, the best of these for short budgets; give it a --time-budget) or fast_wide "
                           "(fast at width 96 with label smoothing 0.2: level with it or ahead for budgets of 10 "
                           "of its epochs or more); flags given beside it override it")
    arch: str = _opt("resnet18_cifar", "model: resnet18_cifar (3x3 stride-1 stem, no max-pool), fast_cifar "
                                       "(airbench-style: whitened 2x2 stem, three conv groups), resnet34_cifar, "
                                       "resnet50_cifar, resnet101_cifar, resnet152_cifar, resnext50_32x4d_cifar, "
                                       "resnext101_32x8d_cifar (timm's with the CIFAR stem), or any timm model name")
    width: int = _opt(64, "base width of resnet18_cifar and fast_cifar (64 is the standard ResNet18; 16 for quick "
                          "CPU runs); other architectures have their own")
    whiten_stem: bool = _opt(False, "resnet18_cifar's first conv starts whitening the training images' 3x3 patches "
                                    "(fast_cifar's first layer, airbench's), instead of random")
    image_size: int = _opt(0, "side the images are resized to on the device (bilinear, batched) before the model, in "
                              "training, evaluation, TTA and predict alike, e.g. 224 for ImageNet weights (0: as "
                              "they are, 32x32)")
    folds: int = _opt(5, "number of stratified folds (K); 1: a full fit, one model on every image but the "
                         "--holdout, which is its held-out set (no cross-validation; the most accuracy per "
                         "unit of compute, for a short --time-budget or the final submission)")
    holdout: int = _opt(0, "training images kept out of every fold (stratified), on which the fold ensemble and "
                           "the TTA views are measured against single folds; 0 for a submission run")
    seed: int = _opt(0, "seed of the fold split, initial weights, shuffling and augmentation")
    split_seed: int = _opt(-1, "seed of the fold split and holdout alone (-1: --seed): runs of other --seed values "
                               "and one --split-seed hold out the same images, so predict.py --weights oof blends "
                               "them")
    epochs: int = _opt(30, "epochs per fold (with --time-budget: planned instead)")
    time_budget: str = _opt("", "time for all folds' training, e.g. 900, 15m, 2h: each fold's epochs are planned from "
                                "the measured speed so that every fold ends in time with a complete schedule (empty: "
                                "--epochs)")
    batch_size: int = _opt(128, "training batch size (per process)")
    # Muon: well ahead of Nesterov SGD on the full data at two lengths, at nearly its images/s
    # (bench/RESULTS.md). The lr, momentum and decay below are on Muon's scale, not SGD's.
    optimizer: str = _opt("muon", "any timm optimizer name: muon (orthogonalised momentum on conv and linear "
                                  "weights, AdamW on the rest), sgd (Nesterov; with --lr 0.2 --momentum 0.9 "
                                  "--weight-decay 5e-4), lamb, adamw, ...; lookahead_NAME wraps NAME in timm's "
                                  "Lookahead (slow weights pulled halfway to the fast ones every 6 steps; each epoch "
                                  "ends on the slow weights, which are evaluated and saved)")
    lr: float = _opt(0.02, "peak learning rate of the one-cycle schedule")
    momentum: float = _opt(0.95, "momentum of Muon and the SGD-family optimizers")
    weight_decay: float = _opt(0.01, "weight decay (on conv and linear weights; see --decay-norm-and-bias)")
    decay_norm_and_bias: bool = _opt(False, "apply the weight decay to BatchNorm weights and biases too")
    warmup: float = _opt(0.15, "fraction of the steps spent warming the learning rate up (linear)")
    anneal: str = _opt("linear", "shape of the learning-rate decay after the warm-up: linear or cos")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss")
    ema_decay: float = _opt(0.0, "decay of an exponential moving average of the weights, evaluated instead of them (0: off)")
    flip: str = _opt("random", "horizontal flips on the device: random (each image, each epoch, p=0.5), alternate "
                               "(each image flipped every other epoch, from a side drawn once per fold: airbench's "
                               "alternating flip), or none")
    crop_pad: int = _opt(4, "random-crop padding in pixels (0: no crop)")
    crop_fill: str = _opt("zeros", "what the crop's padding holds: zeros, or reflect (the image mirrored at its "
                                   "border, as airbench's crops and the translated TTA views)")
    auto_augment: str = _opt("", "RandAugment-style ops after flip/crop, drawn per image on the device: "
                                 "randaugment, trivialaugment, or empty for none")
    cutout: int = _opt(0, "side of a random square zeroed in each training image (0: off)")
    mixup: float = _opt(0.0, "mixup's alpha: a batch blended with itself reversed, images and labels, by a share "
                             "drawn from Beta(alpha, alpha) (timm's Mixup, one draw a batch; 0: off)")
    cutmix: float = _opt(0.0, "cutmix's alpha: a box of each image replaced by the reversed batch's, the labels "
                              "mixed by its area, drawn from Beta(alpha, alpha) (timm's; 0: off)")
    mixup_prob: float = _opt(1.0, "share of the batches mixed, with --mixup or --cutmix")
    mixup_switch_prob: float = _opt(0.5, "with both --mixup and --cutmix: share of the mixed batches that cutmix")
    mixup_epochs: float = _opt(1.0, "share of the epochs, from the first, whose batches are mixed; the rest train on "
                                    "clean images (timm's --mixup-off-epoch, as a share of the planned epochs)")
    albumentations: str = _opt("", "an albumentations pipeline saved with A.save (JSON, or YAML by its suffix), applied "
                                   "to each training image in worker processes before the device's flip/crop (off "
                                   "with --flip none --crop-pad 0), seeded per (seed, fold, epoch, batch); empty: none")
    pretrained: str = _opt("", "local weights file to start every fold from (state dict or a run's model.pt; "
                                "read with weights_only=True, nothing is downloaded)")
    normalization: str = _opt("auto", "per-channel mean and std the input is standardised with: data (the training "
                                      "images'), imagenet (those ImageNet weights were trained with), or auto: "
                                      "imagenet with --pretrained, data otherwise (a run's model.pt brings its own)")
    whiten_bias_epochs: int = _opt(0, "fast_cifar's whitening layer's bias trains the first E epochs, then stays as it "
                                      "is, as the layer's filters do (airbench's progressive freezing: 3); 0: it "
                                      "trains throughout")
    freeze_epochs: int = _opt(0, "the first E epochs train only the classifier head, the rest of the network frozen "
                                 "(BatchNorm statistics too), as feature extraction does; then everything trains")
    # flip_translate: ahead of flip in every full-data measurement, at every length (bench/RESULTS.md),
    # for 6 forward passes an image instead of 2; on a CPU, predict --tta flip is the cheaper choice.
    tta: str = _opt("flip_translate", "test-time views for OOF and predict: none, flip, flip_translate or "
                                      "flip_translate_weighted (its untranslated pair weighing as its 4 shifted views)")
    pseudo_labels: str = _opt("", "a finished run with the same fold split: fold k adds to its training set the test "
                                  "images that run's fold k predicts with probability >= --pseudo-threshold "
                                  "(empty: off); an epoch is then a pass over the enlarged set")
    pseudo_threshold: float = _opt(0.95, "least predicted probability of a pseudo-labelled test image")
    pseudo_max: int = _opt(10_000, "at most this many pseudo-labelled images per fold: the most confident, "
                                   "an equal share per class (0: no limit)")

    def __post_init__(self):
        self._check_types()
        problems = self._value_problems()
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    def _check_types(self) -> None:
        """Every field of its default's type (an int where a float goes is taken as that float);
        no float is infinite or NaN."""
        wrong_types = []
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # 1 and 1.0 are one config, spelled once
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                wrong_types.append(f"{f.name} must be {'a whole number' if kind is int else kind.__name__}, "
                                   f"not {value!r}")
            elif kind is float and not math.isfinite(value):
                wrong_types.append(f"{f.name} must be a finite number, not {value!r}")
        if wrong_types:
            raise ConfigError("invalid config: " + "; ".join(wrong_types))

    def _value_problems(self) -> list[str]:
        """What is wrong with the values, each named; the names a flag takes are asked of their
        owners (the architectures of model.py, the views and policies of augment.py, timm's
        optimizers)."""
        from timm.optim import list_optimizers

        from kaggle_cifar.augment import AUTO_AUGMENT_POLICIES, CROP_FILLS, FLIPS, TTA_VIEWS
        from kaggle_cifar.model import ARCHS, SCALABLE_ARCHS

        problems = [f"{name} must be {rule}" for name, ok, rule in [

            ("recipe", self.recipe in ("", *RECIPES), f"empty or one of {', '.join(RECIPES)}"),
            ("folds", self.folds >= 1, "at least 1"),
            ("holdout", self.holdout >= 0, "0 or more"),
            ("split_seed", self.split_seed >= -1, "-1 (--seed) or a seed"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("width", self.width >= 1, "at least 1"),
            ("whiten_stem", not self.whiten_stem or self.arch == "resnet18_cifar", "off for " + self.arch),
            ("image_size", self.image_size >= 0, "0 (as they are) or a side in pixels"),
            ("width", self.width == 64 or self.arch in SCALABLE_ARCHS,
             f"64 for {self.arch}, which has its own widths (--width scales {' and '.join(SCALABLE_ARCHS)})"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("optimizer", self.base_optimizer in list_optimizers(),
             "a timm optimizer name (timm.optim.list_optimizers()), or lookahead_ and one"),
            ("lr", self.lr > 0, "positive"),
            ("warmup", 0 < self.warmup < 1, "between 0 and 1"),
            ("anneal", self.anneal in ("linear", "cos"), "linear or cos"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("flip", self.flip in FLIPS, f"one of {', '.join(FLIPS)}"),
            ("crop_pad", self.crop_pad >= 0, "0 or more"),
            ("crop_fill", self.crop_fill in CROP_FILLS, f"one of {', '.join(CROP_FILLS)}"),
            ("crop_pad", self.crop_fill != "reflect" or self.crop_pad < 32,
             "under 32 with --crop-fill reflect (a reflection is narrower than the image)"),
            ("auto_augment", self.auto_augment in ("", *AUTO_AUGMENT_POLICIES),
             f"empty or one of {', '.join(AUTO_AUGMENT_POLICIES)}"),
            ("cutout", self.cutout >= 0, "0 or more"),
            ("mixup", self.mixup >= 0, "0 or more"),
            ("cutmix", self.cutmix >= 0, "0 or more"),
            ("batch_size", self.batch_size % 2 == 0 or not self.mixes,
             "even with --mixup or --cutmix (timm's Mixup takes even batches)"),
            ("mixup_prob", 0 <= self.mixup_prob <= 1, "in [0, 1]"),
            ("mixup_switch_prob", 0 <= self.mixup_switch_prob <= 1, "in [0, 1]"),
            ("mixup_epochs", 0 <= self.mixup_epochs <= 1, "in [0, 1]"),
            ("normalization", self.normalization in NORMALIZATIONS, f"one of {', '.join(NORMALIZATIONS)}"),
            ("whiten_bias_epochs", self.whiten_bias_epochs >= 0, "0 or more"),
            ("whiten_bias_epochs", not self.whiten_bias_epochs or self.arch == "fast_cifar",
             "0 unless --arch fast_cifar (the one with a whitening layer)"),
            ("freeze_epochs", self.freeze_epochs >= 0, "0 or more"),
            ("freeze_epochs", not self.freeze_epochs or self.freeze_epochs < self.epochs or bool(self.time_budget),
             f"fewer than --epochs ({self.epochs}), so that the whole network trains at the end"),
            ("tta", self.tta in TTA_VIEWS, f"one of {', '.join(TTA_VIEWS)}"),
            ("pseudo_threshold", 0 < self.pseudo_threshold <= 1, "in (0, 1]"),
            ("pseudo_max", self.pseudo_max >= 0, "0 or more"),
        ] if not ok]
        if self.time_budget:
            try:
                if parse_duration(self.time_budget) == 0:
                    problems.append(f"time_budget {self.time_budget!r}: no time to train in")
            except ConfigError as e:
                problems.append(str(e))
        if self.arch not in ARCHS and not _is_timm_model(self.arch):
            problems.insert(0, f"arch must be {' or '.join(ARCHS)} or a timm model name" + _did_you_mean(self.arch))
        return problems

    @property
    def mixes(self) -> bool:
        """Training mixes images, with --mixup or --cutmix (train.Mixing)."""
        return bool(self.mixup or self.cutmix)

    @property
    def predict_batch(self) -> int:
        """Images per forward pass when this run's model predicts (its evaluation, OOF and holdout,
        predict's default): PREDICT_BATCH at the images' own 32x32, fewer for a model that resizes
        them larger, whose activations grow with the area (224x224: 41)."""
        side = self.image_size or 32
        return max(1, PREDICT_BATCH * 32 * 32 // (side * side))

    @property
    def fold_seed(self) -> int:
        """The seed of the fold split and holdout: --split-seed, else --seed."""
        return self.seed if self.split_seed == -1 else self.split_seed

    @property
    def time_budget_s(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None

    @property
    def full_fit(self) -> bool:
        """One fold: one model on every image but the holdout, scored on the holdout."""
        return self.folds == 1

    @property
    def base_optimizer(self) -> str:
        """The optimizer's timm name without the Lookahead wrapper's prefix (timm's spelling)."""
        return self.optimizer.removeprefix(LOOKAHEAD)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable config ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a config (a JSON object of TrainConfig fields)")
        if isinstance(data.get("flip"), bool):  # the yes/no form of --flip: random or none
            data["flip"] = "random" if data["flip"] else "none"
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {sorted(unknown)}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def describe(self) -> str:
        """The fields that differ from the defaults, as flags would set them."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return "defaults" + (" except " + ", ".join(changed) if changed else "")


NORMALIZATIONS = ("auto", "data", "imagenet")
LOOKAHEAD = "lookahead_"  # timm's prefix of an optimizer name that wraps it in Lookahead


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _did_you_mean(name: str) -> str:
    import difflib

    import timm

    from kaggle_cifar.model import ARCHS

    close = difflib.get_close_matches(name, [*ARCHS, *timm.list_models()], n=3)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--batch-size` for `batch_size`), default None so that only
    the flags given on the command line override `--config FILE` or the dataclass defaults."""
    group = parser.add_argument_group("training config (saved as RUN_DIR/config.json)")
    group.add_argument("--config", type=Path, help="config.json of an earlier run to start from; flags override it")
    for f in dataclasses.fields(TrainConfig):
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {"type": type(f.default)}
        group.add_argument("--" + f.name.replace("_", "-"), **kind, default=None,
                           help=f"{f.metadata['help']} (default: {f.default})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config FILE (or the defaults), then --recipe's values, then every other flag given."""
    base = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    if args.recipe is not None:
        if args.recipe not in RECIPES:
            raise ConfigError(f"--recipe {args.recipe}: use one of {', '.join(RECIPES)}")
        base = dataclasses.replace(base, recipe=args.recipe, **RECIPES[args.recipe])
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None and f.name != "recipe"}
    return dataclasses.replace(base, **overrides)
