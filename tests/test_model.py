import torch

from kaggle_cifar import device


def test_autocast_dtype_is_bf16_only_where_the_gpu_computes_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    assert device.autocast_dtype(torch.device("cpu")) is None
    capability = (8, 0)  # A100
    assert device.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    capability = (7, 5)  # T4 (P100: 6.0): bf16 only emulated, so fp16 with loss scaling
    assert device.autocast_dtype(torch.device("cuda")) == torch.float16
