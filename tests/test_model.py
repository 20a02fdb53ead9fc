import torch

from kaggle_cifar import device as model


def test_autocast_dtype_is_bf16_only_where_the_gpu_computes_it(monkeypatch):
    asked = {}

    def bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert model.autocast_dtype(torch.device("cpu")) is None
    supported = True
    assert model.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    supported = False
    assert model.autocast_dtype(torch.device("cuda")) == torch.float16  # T4, P100: fp16 with loss scaling
    assert asked["including_emulation"] is False  # emulated bf16 is slower than fp16
