"""Batched augmentation and test-time views on uint8 NCHW image tensors, on whatever device they live.

Each op is a handful of tensor ops over the whole batch (airbench-style), never a per-image Python
loop, so it runs at GPU speed next to the model."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def flip_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (p=0.5) and random crop back to size from a zero-padded copy."""
    n, _, h, w = images.shape
    device = images.device
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if pad == 0:
        return images
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
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


# torchvision's policies draw one op and magnitude for the whole tensor they are given. Given the
# batch in this many groups, the ops vary within a batch at a fixed number of kernel launches a step.
AUTO_AUGMENT_GROUPS = 16
AUTO_AUGMENT_POLICIES = {"randaugment": v2.RandAugment(), "trivialaugment": v2.TrivialAugmentWide()}


def auto_augment(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandAugment (2 ops, magnitude 9) or TrivialAugmentWide, one draw per group of
    the batch. The draws are Python scalars taken from `generator`, a CPU generator (so no device
    sync), in place of the global RNG torchvision reads, which is left as it was."""
    transform = AUTO_AUGMENT_POLICIES[policy]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.set_state(generator.get_state())
        out = torch.cat([transform(group) for group in images.chunk(AUTO_AUGMENT_GROUPS)])
        generator.set_state(torch.default_generator.get_state())
    return out


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift every image by (dy, dx) pixels, filling the uncovered border by reflection."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


# Test-time views: (horizontal flip, dy, dx). flip_translate is the flip pair at the original
# position and shifted one pixel each diagonal way, as the fastest CIFAR-10 trainers use.
TTA_VIEWS = {
    "none": [(False, 0, 0)],
    "flip": [(False, 0, 0), (True, 0, 0)],
    "flip_translate": [(f, d, d) for f in (False, True) for d in (0, -1, 1)],
}


def tta_view(images: torch.Tensor, view: tuple[bool, int, int]) -> torch.Tensor:
    flip, dy, dx = view
    return translate(images.flip(3) if flip else images, dy, dx)
