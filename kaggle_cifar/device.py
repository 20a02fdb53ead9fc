"""What depends on the device: mixed precision, and moving host rows onto it."""

from __future__ import annotations

import numpy as np
import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for training and predict: bf16 where the GPU computes it natively (Ampere
    and later), fp16 on older GPUs such as Kaggle's T4 and P100 (where bf16 is only emulated, slowly),
    none (float32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device) -> torch.autocast:
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of (memory-mapped, read-only) host rows as a tensor on `device`."""
    return torch.from_numpy(np.array(rows)).to(device)
