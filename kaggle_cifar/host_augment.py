"""A competitor's own albumentations pipeline (`--albumentations FILE`, saved with `A.save`), applied
one image at a time on the host, in worker processes that deliver the epoch's batches in order.

Each batch's draws are seeded by (the epoch's seed, the batch's index), so the images a batch gets do
not depend on how many workers there are or which one made it, and a resumed run replays them. The
device's flip/crop (and the rest of augment.py) runs on the result as usual."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from kaggle_cifar.errors import ConfigError, first_line

PIN = "albumentations==2.0.8"  # the last MIT release; its successor is AGPL


def load_pipeline(path: Path | str, image_shape: tuple[int, int, int] = (32, 32, 3)):
    """The pipeline saved in `path` (JSON, or YAML by its suffix), refused in one sentence if it is
    not one or does not give back an image of the shape and dtype it was given."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    try:
        import albumentations as A
    except ImportError:
        raise ConfigError(f"--albumentations {path}: albumentations is not installed (pip install '{PIN}')") from None
    fmt = "yaml" if Path(path).suffix.lower() in (".yaml", ".yml") else "json"
    try:
        pipeline = A.load(str(path), data_format=fmt)
    except OSError as e:
        raise ConfigError(f"--albumentations {path}: unreadable ({e.strerror or e})") from None
    except Exception as e:  # albumentations raises whatever its parser or a transform's validation raises
        raise ConfigError(f"--albumentations {path}: not an albumentations pipeline saved with A.save as {fmt} "
                          f"({first_line(e, typed=True)})") from None
    probe = np.zeros(image_shape, dtype=np.uint8)
    pipeline.set_random_seed(0)  # the check draws the same way every time
    try:
        out = pipeline(image=probe)["image"]
    except Exception as e:
        raise ConfigError(f"--albumentations {path}: fails on a {'x'.join(map(str, image_shape))} uint8 image "
                          f"({first_line(e, typed=True)})") from None
    problem = changed_image(probe, out)
    if problem:
        raise ConfigError(f"--albumentations {path}: {problem}")
    return pipeline


def changed_image(image: np.ndarray, out) -> str | None:
    """Why the pipeline's output `out` for `image` cannot be trained on, or None."""
    if isinstance(out, np.ndarray) and out.shape == image.shape and out.dtype == np.uint8:
        return None
    got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
    return (f"turns a uint8 {image.shape} image into {got}; the pipeline must keep the images' size and uint8 "
            f"type (resizing is --image-size's job, normalising the model's; leave out ToTensorV2 and Normalize)")


class _Images(torch.utils.data.Dataset):
    """Item (seed, indices): those images, each through the pipeline, the pipeline seeded by `seed`.
    The images are a CPU tensor, which reaches the workers through shared memory, not a copy."""

    def __init__(self, path: str, images: torch.Tensor):
        self.path, self.images = path, images
        self.pipeline = None  # loaded in each worker, not pickled from the parent

    def __getitem__(self, item: tuple[int, np.ndarray]) -> torch.Tensor:
        if self.pipeline is None:
            import cv2

            cv2.setNumThreads(1)  # one process per core already
            self.pipeline = load_pipeline(self.path, tuple(self.images.shape[1:]))
        seed, indices = item
        self.pipeline.set_random_seed(seed)
        out = []
        for i in indices:  # a transform drawn with a small probability slips past load_pipeline's one image
            image = self.images[i].numpy()
            augmented = self.pipeline(image=image)["image"]
            problem = changed_image(image, augmented)
            if problem:
                raise ValueError(problem)
            out.append(augmented)
        return torch.from_numpy(np.stack(out))


class _EpochItems(torch.utils.data.Sampler):
    """The items of the epoch at hand, set before each epoch."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


PREFETCHED = 4  # batches each worker makes ahead


def local_ranks() -> int:
    """The processes torchrun started on this machine (LOCAL_WORLD_SIZE), each with its workers."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def workers() -> int:
    """Worker processes: this rank's share of the cores this process may use, less one for the
    training loop."""
    return max(1, len(os.sched_getaffinity(0)) // local_ranks() - 1)


SHARED_MEMORY = Path("/dev/shm")


def check_shared_memory(images: torch.Tensor, batch_size: int, path: str) -> None:
    """The workers read the fold's images, and hand back their batches, through shared memory
    (/dev/shm: 64 MB by default in a Docker container): refused before the workers start if what
    this machine's ranks need does not fit in it, saying what to do."""
    if not SHARED_MEMORY.is_dir():
        return
    ranks = local_ranks()
    image_bytes = images[0].numel() * images.element_size() if len(images) else 0
    needed = ranks * (images.numel() * images.element_size() + workers() * PREFETCHED * batch_size * image_bytes)
    free = shutil.disk_usage(SHARED_MEMORY).free
    if needed > free:
        raise ConfigError(f"--albumentations {path}: its workers need {needed / 2**20:,.0f} MB of shared memory "
                          f"({SHARED_MEMORY}: the fold's images and the batches in flight, for {ranks} rank(s) here), "
                          f"and {free / 2**20:,.0f} MB are free: in Docker start the container with "
                          f"--shm-size={math.ceil(2 * needed / 2**30)}g, or train without --albumentations")


class HostAugmenter:
    """A fold's worker processes (started once, kept across its epochs) that make each epoch's
    batches with the albumentations pipeline in `path` and deliver them in order."""

    def __init__(self, path: str, images: torch.Tensor, pin_memory: bool, batch_size: int):
        check_shared_memory(images, batch_size, path)
        self.path = path
        # Workers start from a clean server process, never forked from this one: a child forked
        # from a process whose OpenMP or OpenCV threads were running can hang in its first op.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "numpy", "cv2"])
        self.sampler = _EpochItems()
        self.loader = torch.utils.data.DataLoader(_Images(path, images), batch_size=None, sampler=self.sampler,
                                                  num_workers=workers(), prefetch_factor=PREFETCHED, persistent_workers=True,
                                                  pin_memory=pin_memory, multiprocessing_context=context)

    def epoch(self, batches: list[np.ndarray], seed: int) -> Iterator[torch.Tensor]:
        """The uint8 NHWC batches `batches` (index arrays into the images), in order, batch b's
        draws seeded by (seed, b): the same whichever worker makes it, and again on a resume."""
        self.sampler.items = [(seed * 100_003 + b, indices) for b, indices in enumerate(batches)]
        try:
            yield from self.loader
        except Exception as e:  # the DataLoader re-raises a worker's exception here, its cause on the last line
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--albumentations {self.path}: failed in a worker process ({cause[:200]})") from None
