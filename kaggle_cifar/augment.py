"""Batched augmentation and test-time views on uint8 NCHW image tensors, on whatever device they live.

Each op is a handful of tensor ops over the whole batch (airbench-style), never a per-image Python
loop, so it runs at GPU speed next to the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


FLIPS = ("random", "alternate", "none")  # --flip: see train.epoch_flips for alternate


CROP_FILLS = {"zeros": "constant", "reflect": "reflect"}  # --crop-fill: torch.nn.functional.pad's mode


def flip_crop(images: torch.Tensor, pad: int, generator: torch.Generator, flip: bool = True,
              flipped: torch.Tensor | None = None, fill: str = "zeros") -> torch.Tensor:
    """Horizontal flip of the images `flipped` names (one bool each; default: each with p=0.5),
    then a random crop back to size from a copy padded by `fill` (CROP_FILLS)."""
    n, _, h, w = images.shape
    device = images.device
    if flip:
        if flipped is None:
            flipped = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    if pad == 0:
        return images
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode=CROP_FILLS[fill])
    dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    # One gather: row index dy+i and column index dx+j for every image at once.
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square at a random centre in each image (clipped at the borders)."""
    n, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h, (n, 1, 1), device=device, generator=generator) - size // 2
    left = torch.randint(0, w, (n, 1, 1), device=device, generator=generator) - size // 2
    y = torch.arange(h, device=device)[None, :, None]
    x = torch.arange(w, device=device)[None, None, :]
    inside = (y >= top) & (y < top + size) & (x >= left) & (x < left + size)
    return images * ~inside[:, None]


# RandAugment (Cubuk et al., 2020) and TrivialAugment-Wide (Muller & Hutter, 2021), batched: every
# image draws its own op and strength, every op runs on the whole batch as tensor ops, and each image
# keeps its own op's result. torchvision's versions draw one op per call and build each geometric
# op's matrix and the sharpness kernel with torch.tensor(..., device=...), a host sync each on a GPU,
# so they cannot serve a training step. The ops and their ranges here are torchvision's.
AUTO_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


@dataclass(frozen=True)
class AutoAugmentPolicy:
    ops_per_image: int
    magnitude: float | None  # fraction of each range for every image; None: each image draws one of 31 bins
    shear: float             # shear factor at full magnitude
    translate: float         # fraction of the image side at full magnitude
    rotate: float            # degrees at full magnitude
    enhance: float           # brightness, color, contrast and sharpness factor 1 +- this at full magnitude
    posterize: int           # bits dropped at full magnitude
    # solarize: the threshold falls from 255 to 0 as the magnitude grows, in both policies


AUTO_AUGMENT_POLICIES = {
    "randaugment": AutoAugmentPolicy(ops_per_image=2, magnitude=9 / 30, shear=0.3, translate=150 / 331, rotate=30.0,
                                     enhance=0.9, posterize=4),
    "trivialaugment": AutoAugmentPolicy(ops_per_image=1, magnitude=None, shear=0.99, translate=1.0, rotate=135.0,
                                        enhance=0.99, posterize=6),
}


def auto_augment(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """The policy's ops, drawn per image (op, strength and sign) from `generator`, on uint8 NCHW."""
    p = AUTO_AUGMENT_POLICIES[policy]
    n, device = len(images), images.device
    for _ in range(p.ops_per_image):
        op = torch.randint(len(AUTO_AUGMENT_OPS), (n,), device=device, generator=generator)
        if p.magnitude is None:
            magnitude = torch.randint(31, (n,), device=device, generator=generator) / 30
        else:
            magnitude = torch.full((n,), p.magnitude, device=device)
        sign = torch.randint(2, (n,), device=device, generator=generator) * 2 - 1
        images = apply_ops(images, op, magnitude * sign, p)
    return images


def apply_ops(images: torch.Tensor, op: torch.Tensor, strength: torch.Tensor, p: AutoAugmentPolicy) -> torch.Tensor:
    """Op AUTO_AUGMENT_OPS[op[i]] at signed strength[i] (a fraction of its range, in [-1, 1]) on
    image i of a uint8 NCHW batch; unsigned ops use the strength's size."""
    x = images.float()
    f = strength[:, None, None, None]
    gray = (x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114).floor()
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi == lo  # autocontrast leaves a flat channel as it is
    kept_bits = torch.round(8 - p.posterize * f.abs())
    results = {
        "brightness": _blend(x, 0.0, 1 + p.enhance * f),  # blended with black
        "color": _blend(x, gray, 1 + p.enhance * f),
        "contrast": _blend(x, gray.mean((1, 2, 3), keepdim=True), 1 + p.enhance * f),
        "sharpness": _blend(x, _smoothed(x), 1 + p.enhance * f),
        "posterize": x - x % 2 ** (8 - kept_bits),
        "solarize": torch.where(x >= 255 * (1 - f.abs()), 255 - x, x),
        "autocontrast": (x - torch.where(flat, 0, lo)) / torch.where(flat, 1, (hi - lo) / 255),
        "equalize": v2.functional.equalize(images).float(),
    }
    out = _affine(x, op, strength, p)
    for name, result in results.items():
        out = torch.where((op == AUTO_AUGMENT_OPS.index(name))[:, None, None, None], result, out)
    return out.clamp(0, 255).to(torch.uint8)  # truncation, as torchvision casts


def _blend(x: torch.Tensor, degenerate: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    return x * factor + degenerate * (1 - factor)


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter inside the border, the image itself on it (torchvision's sharpness)."""
    kernel = torch.full((x.shape[1], 1, 3, 3), 1 / 13, device=x.device)
    kernel[:, :, 1, 1] = 5 / 13
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.nn.functional.conv2d(x, kernel, groups=x.shape[1]).round()
    return out


def _affine(x: torch.Tensor, op: torch.Tensor, strength: torch.Tensor, p: AutoAugmentPolicy) -> torch.Tensor:
    """The geometric ops (shear, translate, rotate about the centre; nearest pixel, black fill) as one
    affine resampling of the batch; other images pass through untouched."""
    n, _, h, w = x.shape
    chosen = {name: op == AUTO_AUGMENT_OPS.index(name) for name in AUTO_AUGMENT_OPS[1:6]}
    zero = torch.zeros_like(strength)
    angle = torch.where(chosen["rotate"], strength * math.radians(p.rotate), zero)
    shear_x = torch.where(chosen["shear_x"], strength * p.shear, zero)
    shear_y = torch.where(chosen["shear_y"], strength * p.shear, zero)
    # In affine_grid's coordinates an image side is 2 long, so a pixel-space matrix is rescaled by the aspect.
    theta = torch.stack([
        torch.stack([angle.cos(), (shear_x - angle.sin()) * h / w,
                     torch.where(chosen["translate_x"], 2 * p.translate * strength, zero)], 1),
        torch.stack([(shear_y + angle.sin()) * w / h, angle.cos(),
                     torch.where(chosen["translate_y"], 2 * p.translate * strength, zero)], 1),
    ], 1)
    grid = torch.nn.functional.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    warped = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    geometric = torch.stack(list(chosen.values())).any(0)
    return torch.where(geometric[:, None, None, None], warped, x)


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift every image by (dy, dx) pixels, filling the uncovered border by reflection."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


# Test-time views: (horizontal flip, dy, dx), averaged with equal weights, a view listed twice
# weighing twice (and predicted once). flip_translate is the flip pair at the original position and
# shifted one pixel each diagonal way, as the fastest CIFAR-10 trainers use; its weighted form is
# airbench's, the untranslated pair weighing as much as the four shifted views together. Gated TTA
# (inference.gated_probs) adds a set's views in this order, each only for the images still unsure:
# the plain view first, then the flip, then shifts that alternate flip and direction, so that each
# next view is the one least like those before it.
_SHIFTED = [(True, 1, 1), (False, -1, -1), (True, -1, -1), (False, 1, 1)]
TTA_VIEWS = {
    "none": [(False, 0, 0)],
    "flip": [(False, 0, 0), (True, 0, 0)],
    "flip_translate": [(False, 0, 0), (True, 0, 0), *_SHIFTED],
    "flip_translate_weighted": [(False, 0, 0), (False, 0, 0), (True, 0, 0), (True, 0, 0), *_SHIFTED],
}


def tta_view(images: torch.Tensor, view: tuple[bool, int, int]) -> torch.Tensor:
    flip, dy, dx = view
    return translate(images.flip(3) if flip else images, dy, dx)
