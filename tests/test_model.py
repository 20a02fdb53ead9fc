import pytest
import torch

from kaggle_cifar import device


def test_mixed_precision_is_bf16_only_where_the_device_computes_it_and_none_under_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    for native, dtype in ((True, torch.bfloat16), (False, None)):  # AVX-512 BF16 or AMX, or neither
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
        assert device.Policy.of(torch.device("cpu")).autocast_dtype == dtype
        assert device.Policy.of(torch.device("cpu"), "float32").autocast_dtype is None  # the reference, on request
    capability = (8, 0)  # A100
    assert device.Policy.of(torch.device("cuda")).autocast_dtype == torch.bfloat16
    capability = (7, 5)  # T4 (P100: 6.0): bf16 only emulated, so fp16 with loss scaling
    t4 = device.Policy.of(torch.device("cuda"))
    assert t4.autocast_dtype == torch.float16 and t4.loss_scaling and t4.newton_schulz_dtype == torch.float16
    assert not device.Policy.of(torch.device("cuda"), "float32").loss_scaling


@pytest.mark.parametrize("arch, width, pairs", [("fast_cifar", 4, 12), ("resnet18_cifar", 16, 8), ("resnet18_cifar", 64, 27)])
def test_the_first_conv_whitens_the_patches_of_its_training_images(arch, width, pairs):
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.errors import ConfigError
    from kaggle_cifar.train import initial_model

    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (600, 16, 16, 3), generator=g, dtype=torch.uint8)
    images = base.repeat_interleave(2, 1).repeat_interleave(2, 2)  # neighbouring pixels correlate strongly
    cfg = TrainConfig(arch=arch, width=width, whiten_stem=arch == "resnet18_cifar")
    net = initial_model(cfg, 3, 0, images=images).network
    conv = net.whiten if arch == "fast_cifar" else net.stem[0]
    x = images.permute(0, 3, 1, 2).float()
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, conv.weight[:pairs])  # the first half: the other is its negative
    covariance = torch.cov(out.permute(1, 0, 2, 3).reshape(pairs, -1))
    torch.testing.assert_close(covariance, torch.eye(pairs), atol=0.05, rtol=0)
    torch.testing.assert_close(conv.weight[pairs:2 * pairs], -conv.weight[:pairs])
    if arch == "fast_cifar":
        assert not conv.weight.requires_grad  # fixed, as airbench's
        with pytest.raises(ConfigError, match="whiten_stem must be off for fast_cifar"):
            TrainConfig(arch=arch, whiten_stem=True)
    else:  # without the flag the stem stays random
        plain = initial_model(TrainConfig(arch=arch, width=width), 3, 0, images=images).network.stem[0].weight
        assert not torch.allclose(plain[:pairs], conv.weight[:pairs], atol=0.1)


def test_fast_cifar_trains_and_predicts_through_the_pipeline(tmp_path):
    import io
    import json

    import pandas as pd

    from conftest import TINY, call_script, make_competition
    from kaggle_cifar.model import build_model, training_flops_per_image

    competition = make_competition(tmp_path / "input")
    run = tmp_path / "run"
    call_script("train_folds.py", "--input", str(competition), "--run-dir", str(run), *TINY[:-4], "--batch-size", "16",
                "--lr", "0.5", "--epochs", "8", "--arch", "fast_cifar")  # its 1/9 output scale wants a high rate
    assert json.loads((run / "report.json").read_text())["cv_accuracy"] > 0.6  # chance: 1/3
    sub = pd.read_csv(io.StringIO(call_script("predict.py", "--input", str(competition), "--run-dir", str(run)).stdout))
    assert len(sub) == 24
    fast = training_flops_per_image(build_model("fast_cifar", 10, 64), (3, 32, 32))
    resnet = training_flops_per_image(build_model("resnet18_cifar", 10, 64), (3, 32, 32))
    assert fast < resnet / 3


def test_the_whitening_bias_trains_its_epochs_and_then_stays_while_the_rest_trains_on(tmp_path, monkeypatch):
    from conftest import make_competition
    from kaggle_cifar import distributed, train
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.cv import train_folds
    from kaggle_cifar.errors import ConfigError

    small = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cfg = TrainConfig(folds=1, epochs=3, arch="fast_cifar", width=4, batch_size=4, lr=0.05, whiten_bias_epochs=1)
    states, real_epoch = [train.initial_model(cfg, 3, 0).state_dict()], train.train_one_epoch

    def recorded(t, *args, **kwargs):
        row = real_epoch(t, *args, **kwargs)
        states.append({name: value.clone() for name, value in t.model.state_dict().items()})
        return row

    monkeypatch.setattr(train, "train_one_epoch", recorded)
    train_folds(cfg, small, tmp_path / "run", small / ".cache", distributed.setup("cpu", "float32"))
    bias = [state["1.whiten.bias"] for state in states]
    assert not torch.equal(bias[1], bias[0]) and torch.equal(bias[2], bias[1]) and torch.equal(bias[3], bias[1])
    assert not torch.equal(states[3]["1.head.weight"], states[2]["1.head.weight"])  # the rest trains on
    with pytest.raises(ConfigError, match="whiten_bias_epochs must be 0 unless --arch fast_cifar"):
        TrainConfig(whiten_bias_epochs=3)


@pytest.mark.parametrize("arch", ["resnet34_cifar", "resnet50_cifar", "resnext50_32x4d_cifar"])
def test_the_resnet_family_keeps_a_32x32_image_whole_into_its_first_stage(arch):
    from kaggle_cifar.model import build_model

    model = build_model(arch, 10, 64).eval()
    seen = {}
    model.network.layer1.register_forward_hook(lambda m, i, out: seen.update(shape=out.shape))
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert logits.shape == (2, 10) and seen["shape"][-2:] == (32, 32)  # timm's ImageNet stem would give 8x8
    assert model.network.conv1.kernel_size == (3, 3) and model.network.conv1.stride == (1, 1)


def test_width_is_refused_where_the_architecture_has_its_own():
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"width must be 64 for resnet50_cifar"):
        TrainConfig(arch="resnet50_cifar", width=16)
    assert TrainConfig(arch="fast_cifar", width=16).width == 16


@pytest.mark.parametrize("capability,width,channels_last", [("AVX2", 4, False), ("AVX2", 8, False), ("AVX2", 16, True),
                                                            ("AVX512", 4, False), ("AVX512", 8, False), ("AVX512", 16, True)])
def test_narrow_models_run_nchw_on_cpus_where_onednn_fails_in_channels_last(monkeypatch, capability, width,
                                                                             channels_last):
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.model import for_config

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    policy = device.Policy.of(torch.device("cpu"))
    model = policy.place(for_config(TrainConfig(width=width), 3))
    options = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: options.update(kwargs.get("options", {})))
    policy.compiled(model)
    assert options.get("layout_optimization", True) == channels_last  # inductor may not choose channels_last either
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8).permute(0, 3, 1, 2))  # a batch as augment gives it
    layouts = {x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in seen}
    assert layouts == {channels_last}
