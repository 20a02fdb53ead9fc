"""The GPU path, proven on the CPU: device selection with CUDA mocked, the process-group timeouts,
host syncs counted per step, the compiled step's graphs, the fp16 loss-scaling path, memory."""

from __future__ import annotations

import dataclasses
import re
import runpy
import sys

import pandas as pd
import pytest
import torch

from conftest import CALIBRATION, ROOT, call_script, make_competition, record_newton_schulz, run_script
from kaggle_cifar import device, distributed, doctor, probe
from kaggle_cifar.config import TrainConfig
from kaggle_cifar.cv import train_folds
from kaggle_cifar.data import default_cache_dir
from kaggle_cifar.errors import ConfigError
from kaggle_cifar.folds import FoldData
from kaggle_cifar.inference import batch_probs
from kaggle_cifar.train import build_training, train_step

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's get_arch_list()
CPU = distributed.setup("cpu", "float32")  # as conftest.one_precision makes every run


@pytest.fixture
def gpus(monkeypatch):
    """Two mocked GPUs of the given compute capability (a T4 by default)."""
    state = {"capability": (7, 5)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ARCHS)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    return state


def test_cuda_on_a_machine_without_one_is_one_error_line(tmp_path):
    competition = make_competition(tmp_path / "input", per_class=4, n_test=3)
    proc = call_script("train_folds.py", "--input", str(competition), "--run-dir", str(tmp_path / "run"),
                       "--device", "cuda", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --device cuda: torch sees no CUDA GPU here") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_gpu_torch_cannot_use_is_an_error_not_a_silent_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver older than the wheel's CUDA
    monkeypatch.setattr(device, "nvidia_gpu_visible", lambda: True)
    with pytest.raises(ConfigError, match=r"an NVIDIA GPU is visible here but torch .* cannot use it.*--device cpu"):
        device.select(None)
    assert device.select("cpu") == torch.device("cpu")  # asked for: the CPU
    monkeypatch.setattr(device, "nvidia_gpu_visible", lambda: False)
    assert device.select(None) == torch.device("cpu")  # no GPU here: the CPU, as said at the start


def test_each_torchrun_rank_takes_its_own_gpu_and_a_pinned_one_is_refused_when_shared(gpus):
    assert device.select(None, local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert device.select("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert device.select("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"--device cuda:0 under torchrun with 2 processes .* NCCL refuses"):
        device.select("cuda:0", local_rank=1, world_size=2)
    with pytest.raises(ConfigError, match=r"this machine shows 2 GPU\(s\)"):
        device.select("cuda:2")
    with pytest.raises(ConfigError, match=r"--device tpu: not a device"):
        device.select("tpu")


def test_a_gpu_without_kernels_in_this_torch_is_refused_and_compile_is_off_below_7_0(gpus):
    assert device.Policy.of(torch.device("cuda", 0)).compile_training
    assert not device.Policy.of(torch.device("cpu")).compile_training
    gpus["capability"] = (8, 9)  # no sm_89 in the list, but sm_86 binaries run on 8.9
    assert device.select("cuda") == torch.device("cuda", 0)
    gpus["capability"] = (6, 0)  # Kaggle's P100
    assert not device.Policy.of(torch.device("cuda", 0)).compile_training  # Triton needs 7.0
    assert device.Policy.of(torch.device("cuda", 0)).loss_scaling  # no native bf16: fp16 with loss scaling
    with pytest.raises(ConfigError, match=r"Tesla T4 \(cuda:0\): compute capability 6\.0 has no kernels"):
        device.select("cuda")
    assert device.kernel_problem((6, 0), ["sm_50", "compute_50"]) is None  # PTX runs on later GPUs


def test_ranks_wait_through_a_gloo_group_with_a_long_timeout(gpus, monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: calls.update(init=(backend, timeout)))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend, timeout: ("group", backend, timeout))
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None: calls.update(barrier=group))
    ctx = distributed.setup()
    assert ctx.device == torch.device("cuda", 1)
    assert calls["init"][0] == "nccl"
    _, backend, timeout = ctx.wait_group
    assert backend == "gloo" and timeout.total_seconds() >= 12 * 3600  # a fold of waiting, or a decode
    ctx.barrier()
    assert calls["barrier"] is ctx.wait_group


def synthetic_fold(n: int = 64, classes: int = 3) -> FoldData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    return FoldData(0, [str(c) for c in range(classes)], torch.full((3,), 120.0), torch.full((3,), 60.0),
                    images, targets, images[:16], targets[:16], images[:0])


FLOAT32 = device.Policy.of(torch.device("cpu"), "float32")
FP16 = device.Policy(torch.device("cpu"), torch.float16, torch.float16)  # a T4's: fp16 autocast, GradScaler, fp16 Muon


def syncs_per_step(cfg: TrainConfig, steps: int = 3, policy: device.Policy = FLOAT32) -> int:
    data = synthetic_fold()
    t = build_training(cfg, data, policy)
    x = data.train_images[:cfg.batch_size].permute(0, 3, 1, 2)
    y = data.train_targets[:cfg.batch_size]
    train_step(t, x, y, 1)  # the first step creates the optimizer state
    with probe.HostSyncs(on_host=probe.host_step_counters(t.optimizer)) as syncs:
        for step in range(steps):
            train_step(t, x, y, step + 2)
    return syncs.count / steps


@pytest.mark.parametrize("policy, optimizer", [(FLOAT32, "muon"), (FLOAT32, "sgd"), (FP16, "sgd")])
def test_a_training_step_never_waits_for_the_device(policy, optimizer):
    """fp16 with the default Muon waits once a step: the next test."""
    assert syncs_per_step(TrainConfig(width=4, batch_size=16, ema_decay=0.9, optimizer=optimizer), policy=policy) == 0


def test_an_optimizer_that_counts_its_steps_on_the_host_reads_only_those_counters():
    """timm's NAdamW keeps its step counters in host memory on any device (not capturable): reading
    them waits for no GPU, and the probe is told so. Anything else it is not told counts."""
    nadamw = TrainConfig(width=4, batch_size=16, optimizer="nadamw", lr=0.01)
    assert syncs_per_step(nadamw) == 0
    data = synthetic_fold()
    t = build_training(nadamw, data, FLOAT32)
    train_step(t, data.train_images[:16].permute(0, 3, 1, 2), data.train_targets[:16], 1)
    counters = probe.host_step_counters(t.optimizer)
    assert len(counters) >= 40  # one per weight
    with probe.HostSyncs() as every_read:
        counters[0].item()
    assert every_read.count == 1


@pytest.mark.parametrize("optimizer", ["muon", "lamb"])
def test_without_a_fused_optimizer_the_loss_scaler_syncs_once_per_step(optimizer):
    """What torch's fused SGD and AdamW save on a T4 or P100, seen by the same counter: timm's Muon
    (the default) and LAMB have no fused kernel, so the scaler reads their inf flag on the host."""
    cfg = TrainConfig(width=4, batch_size=16, optimizer=optimizer, lr=0.01)
    assert syncs_per_step(cfg, policy=FP16) == syncs_per_step(cfg) + 1


@pytest.mark.parametrize("policy", ["", "randaugment", "trivialaugment"])
def test_augmentation_never_waits_for_the_device(policy):
    from kaggle_cifar.train import augment

    cfg = TrainConfig(auto_augment=policy, cutout=8)
    images = synthetic_fold().train_images
    with probe.HostSyncs() as syncs:
        augment(images, cfg, torch.Generator().manual_seed(0))
    assert syncs.count == 0, syncs.ops


def test_a_predict_batch_never_waits_for_the_device():
    from kaggle_cifar.augment import TTA_VIEWS

    data = synthetic_fold()
    model = build_training(TrainConfig(width=4), data, CPU.policy).model.eval()
    batch = data.val_images.permute(0, 3, 1, 2)
    with probe.HostSyncs() as syncs, torch.no_grad():
        batch_probs([model, model], batch, TTA_VIEWS["flip_translate"], CPU.policy, temperatures=[0.5, 2.0])
    assert syncs.count == 0, syncs.ops


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("adamw", 1e-3), ("lamb", 0.01), ("muon", 0.02)])
def test_an_overflowing_fp16_step_leaves_weights_and_optimizer_state_untouched(optimizer, lr):
    data = synthetic_fold()
    t = build_training(TrainConfig(width=4, batch_size=16, optimizer=optimizer, lr=lr), data, FP16)
    x, y = data.train_images[:16].permute(0, 3, 1, 2), data.train_targets[:16]
    train_step(t, x, y, 1)  # the optimizer state exists: a skipped step must not advance it
    assert probe.overflow_step_changes_nothing(t, x, y, 2)


def test_a_step_whose_fp16_activations_overflow_leaves_batchnorm_statistics_as_they_were():
    """The scaler skips such a step's update, but its forward pass has already moved BatchNorm's
    running statistics, to inf and NaN (a known PyTorch report), and the EMA would average them in."""
    data = synthetic_fold()
    t = build_training(TrainConfig(width=4, batch_size=16, ema_decay=0.9), data, FP16)
    x, y = data.train_images[:16].permute(0, 3, 1, 2), data.train_targets[:16]
    train_step(t, x, y, 1)
    with torch.no_grad():
        t.model.network.stem[0].weight.mul_(1e6)  # past fp16's 65,504 from the first convolution on
    before = [b.clone() for b in t.batchnorm_statistics()]
    assert len(before) == 3 * 20  # ResNet18's 20 BatchNorm layers
    _, _, skipped = train_step(t, x, y, 2)
    assert skipped
    assert all(torch.equal(a, b) for a, b in zip(before, t.batchnorm_statistics(), strict=True))
    assert all(torch.isfinite(b.float()).all() for b in t.ema.module.buffers())


@pytest.mark.parametrize("native, precision, dtype", [(False, "auto", torch.float32), (True, "auto", torch.bfloat16),
                                                      (True, "float32", torch.float32)])
def test_muon_orthogonalises_in_bf16_only_where_the_device_computes_it_and_never_under_float32(
        native, precision, dtype, monkeypatch):
    """timm's default is bf16, which an AVX2 CPU (or a T4) only emulates, at about 20x the time;
    --precision float32 is float32 everywhere, Muon included."""
    used = record_newton_schulz(monkeypatch)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    data = synthetic_fold()
    policy = device.Policy.of(torch.device("cpu"), precision)
    t = build_training(TrainConfig(width=4, batch_size=16, optimizer="muon", lr=0.02), data, policy)
    train_step(t, data.train_images[:16].permute(0, 3, 1, 2), data.train_targets[:16], 1)
    assert len(used) >= 20 and set(used) == {dtype}  # every conv and linear weight of the ResNet18


@pytest.mark.parametrize("gradient_scale", [1.0, 1e-4])
def test_fp16_newton_schulz_makes_float32s_update_for_gradients_large_and_small(gradient_scale):
    """A T4's Muon orthogonalises in fp16: its update is float32's within 5% for every weight
    and at most a quarter of bf16's error (timm's default), also for gradients whose entries fp16
    cannot hold. Over six seeds on an AVX2 CPU the head, whose iteration converges least, was
    2.1-2.9% off (the convolutions far less), at most 0.17 of bf16's error; casting to fp16
    before normalising (timm's order) flushes the small gradients' update: weights up to 115% off,
    about 100 times bf16's error. Zero-initialised residual branches get no update yet."""
    from kaggle_cifar.optim import build_optimizer

    def update(newton_schulz_dtype: torch.dtype) -> list[torch.Tensor]:
        model, _, batch = two_models()
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = build_optimizer(TrainConfig(optimizer="muon", weight_decay=0.0), model, newton_schulz_dtype)
        steps(model, optimizer, batch, loss_scale=gradient_scale)
        return [p.detach() - p0 for p, p0 in zip(model.parameters(), start, strict=True) if p.ndim >= 2]

    for fp16, bf16, reference in zip(update(torch.float16), update(torch.bfloat16), update(torch.float32), strict=True):
        if not reference.any():
            assert not fp16.any()
            continue
        error = (fp16 - reference).norm() / reference.norm()
        assert torch.isfinite(fp16).all() and error < 0.05 and error < (bf16 - reference).norm() / reference.norm() / 4


def two_models(arch: str = "resnet18_cifar", width: int = 8):
    from kaggle_cifar.model import build_model

    torch.manual_seed(0)
    ours, theirs = build_model(arch, 10, width), build_model(arch, 10, width)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (8,), generator=g)
    return ours, theirs, batch


def steps(model, optimizer, batch, n: int = 1, loss_scale: float = 1.0) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        (torch.nn.functional.cross_entropy(model(batch[0]), batch[1]) * loss_scale).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer, buckets, head_apart", [
    ("muon", None, False), ("muon", 3, False), ("muon", 1, False), ("lookahead_muon", 3, False), ("muon", 3, True)])
def test_muon_in_padded_buckets_makes_timms_update(optimizer, buckets, head_apart, monkeypatch):
    """The same weights after three steps as timm's own Muon, Newton-Schulz in float32 for both,
    whether the updates are orthogonalised one batch per shape, in 3 padded batches or in one, and
    with the head's weights in a group of their own (--freeze-epochs)."""
    from timm.optim import Lookahead, create_optimizer_v2
    from timm.optim import muon as timm_muon

    from kaggle_cifar import optim
    from kaggle_cifar.optim import Muon, build_optimizer

    newton_schulz = timm_muon.zeropower_via_newtonschulz
    monkeypatch.setattr(timm_muon, "zeropower_via_newtonschulz",
                        lambda G, *a, **kw: newton_schulz(G, *a, **{**kw, "dtype": torch.float32}))
    used = record_newton_schulz(monkeypatch)
    ours, theirs, batch = two_models()
    cfg = TrainConfig(optimizer=optimizer, freeze_epochs=int(head_apart))
    optimizer_ours = build_optimizer(cfg, ours, torch.float32, buckets)
    groups = optim.head_apart(cfg, {id(p) for p in theirs.head.parameters()}) if head_apart else None
    optimizer_theirs = create_optimizer_v2(theirs, optimizer, lr=0.02, weight_decay=0.01, momentum=0.95,
                                           param_group_fn=groups)
    assert len(optimizer_ours.param_groups) == 4 if head_apart else 2
    assert isinstance(optimizer_ours, Lookahead) == (optimizer != "muon")
    assert isinstance(getattr(optimizer_ours, "_base_optimizer", optimizer_ours), Muon)
    steps(ours, optimizer_ours, batch, 3)
    steps(theirs, optimizer_theirs, batch, 3)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert len(used) == 3 * sum(1 for p in ours.parameters() if p.ndim >= 2)  # every weight, every step


def test_muon_in_bf16_padded_is_as_close_to_float32s_update_as_timms_bf16():
    """bf16 rounds the padded batches differently from timm's one-by-one iteration (and ours
    normalises in float32): the weights' updates are in all as close to float32's as timm's bf16
    ones (for the ResNet18 at width 8, over eight seeds: 0.63-0.82 of timm's error), and none far
    off. Weight by weight the two roundings trade places: one weight's error was up to 1.15 times
    timm's (seed 5) on an AVX2 CPU, and other CPUs' bf16 kernels round differently again."""
    from timm.optim import create_optimizer_v2

    from kaggle_cifar.optim import build_optimizer

    ours, theirs, batch = two_models()
    reference, _, _ = two_models()
    start = [p.detach().clone() for p in ours.parameters()]
    steps(ours, build_optimizer(TrainConfig(), ours, torch.bfloat16, 3), batch)
    steps(theirs, create_optimizer_v2(theirs, "muon", lr=0.02, weight_decay=0.01, momentum=0.95), batch)
    steps(reference, build_optimizer(TrainConfig(), reference, torch.float32), batch)
    errors = torch.stack([torch.stack(((a - r).norm(), (b - r).norm())) for a, b, r, p0 in zip(
        ours.parameters(), theirs.parameters(), reference.parameters(), start, strict=True) if p0.ndim >= 2 and (b - r).any()]).detach()
    ours_error, timms_error = errors.T
    assert len(errors) >= 5 and ours_error.norm() <= timms_error.norm()  # in all
    assert (ours_error <= 1.5 * timms_error).all()  # and weight by weight


def test_padded_buckets_cost_the_fewest_newton_schulz_flops():
    from kaggle_cifar.model import build_model
    from kaggle_cifar.optim import newton_schulz_flops, partition

    shapes = [(min(s), max(s)) for p in build_model("resnet18_cifar", 10, 64).parameters() if p.ndim >= 2
              for s in [(p.shape[0], p[0].numel())]]
    exact = sum(newton_schulz_flops(*s) for s in shapes)
    assert exact == pytest.approx(103.7e9, rel=1e-3)  # per step, at width 64

    def padded(groups):
        return sum(len(g) * newton_schulz_flops(max(shapes[i][0] for i in g), max(shapes[i][1] for i in g))
                   for g in groups)

    assert [len(g) for g in partition(shapes, None)] == [1, 1, 1, 4, 1, 1, 3, 1, 1, 3, 1, 3]  # one per shape
    three = partition(shapes, 3)
    assert sorted(i for g in three for i in g) == list(range(21)) and len(three) == 3
    assert padded(three) == pytest.approx(1.183 * exact, rel=1e-3)
    assert padded(partition(shapes, 4)) < padded(three) < padded(partition(shapes, 2)) < padded([list(range(21))])


@pytest.mark.parametrize("arch", ["resnet18_cifar", "fast_cifar"])
def test_a_muon_step_on_an_h100_dispatches_at_most_100_ops_and_on_a_t4_pads_nothing(arch, gpus):
    """Each op a Muon step dispatches is a kernel launch on a GPU (timm's loop: about 900 for
    ResNet18). On a GPU with bf16 tensor cores, which does a step's arithmetic in about the time
    the host takes to launch it, the updates go in padded batches: at most 100 ops; on a T4,
    bound by its arithmetic, one batch per shape, unpadded (README, GPU estimates)."""
    from kaggle_cifar.model import build_model
    from kaggle_cifar.optim import build_optimizer

    gpus["capability"] = (9, 0)
    h100 = device.Policy.of(torch.device("cuda", 0))
    gpus["capability"] = (7, 5)
    t4 = device.Policy.of(torch.device("cuda", 0))
    assert h100.muon_buckets == 3 and t4.muon_buckets is None and FLOAT32.muon_buckets is None
    model, _, batch = two_models(arch)
    optimizer = build_optimizer(TrainConfig(arch=arch), model, h100.newton_schulz_dtype, h100.muon_buckets)
    steps(model, optimizer, batch, 2)  # the first step makes the batches and the state
    with probe.DispatchedOps() as dispatched:
        optimizer.step()
    assert 50 < dispatched.count <= 100, dispatched.ops


def test_one_overflowing_fp16_step_is_skipped_and_the_fold_goes_on(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = torch.nn.CrossEntropyLoss

    class InfOnce(real_loss):
        def forward(self, logits, targets):
            calls["n"] += 1
            loss = super().forward(logits, targets)
            return loss * float("inf") if calls["n"] == CALIBRATION + 3 else loss  # epoch 2's first step, fold 0

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", InfOnce)
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cfg = TrainConfig(folds=2, epochs=3, width=4, batch_size=4, lr=0.05)
    train_folds(cfg, competition, tmp_path / "run", competition / ".cache", distributed.Context(0, 1, FP16))
    log = pd.read_csv(tmp_path / "run" / "fold0" / "log.csv")
    assert log["skipped_steps"].tolist() == [0, 1, 0]
    assert log["train_loss"].notna().all() and (log["train_loss"] < 10).all()
    assert (tmp_path / "run" / "fold1" / "result.json").exists()


def test_the_compiled_model_is_one_graph_across_epochs_evaluation_and_folds(tmp_path, monkeypatch):
    """fullgraph=True turns any graph break into an error; the counters catch recompiles."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager",
                                                                                     "fullgraph": True}))
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cfg = TrainConfig(folds=2, epochs=2, width=4, batch_size=4, lr=0.05)
    probe.reset_compile_counts()
    train_folds(cfg, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu", compile=True))
    counts = probe.compile_counts()
    assert counts.clean, counts


def test_a_training_step_that_fails_to_compile_says_so_once_and_trains_on_without_compilation(caplog):
    """A Triton failure on a T4 or a driver mismatch must not kill the fold (inference's
    compilation falls back the same way)."""
    def no_triton(graph, example_inputs):
        raise RuntimeError("Triton does not support this GPU")

    data = synthetic_fold()
    t = build_training(TrainConfig(width=4, batch_size=16), data, dataclasses.replace(CPU.policy, compile=True),
                       backend=no_triton)
    x, y = data.train_images[:16].permute(0, 3, 1, 2), data.train_targets[:16]
    before = [p.detach().clone() for p in t.model.parameters()]
    with caplog.at_level("WARNING"):
        for step in (1, 2):
            loss, _, _ = train_step(t, x, y, step)
    failed = [r.getMessage() for r in caplog.records if "compiling the training step failed" in r.getMessage()]
    assert len(failed) == 1 and "Triton does not support this GPU" in failed[0]
    assert t.step_model is t.model and torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))  # both steps trained


def test_a_run_too_large_for_its_gpu_is_refused_before_training_and_predictions_batch_by_image_area(monkeypatch):
    """timm's resnet50 at --image-size 224: its evaluation and predict batches shrink with the image
    area (at 2,048 images a pass one batch alone would need more than its whole training step); a
    batch size past the T4's memory is refused before training, not at the end of epoch 1, before
    its checkpoint, on every resume."""
    big = TrainConfig(arch="resnet50", image_size=224)
    assert TrainConfig().predict_batch == 2048 and big.predict_batch == 2048 * 32 * 32 // (224 * 224) == 41
    t4 = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * 2**30, 15 * 2**30))
    fits = probe.check_fits(big, 50_000, 10, (32, 32), t4)
    assert 5 * 2**30 < fits.total < 0.9 * 15 * 2**30 and fits.evaluation < 2**30
    assert fits.evaluation * 2048 / 41 > fits.activations  # what a 2,048-image evaluation batch would have taken
    with pytest.raises(ConfigError, match=r"this run needs about \d+\.\d GiB of cuda:0's 15.0 GiB .* lower --batch-size"):
        probe.check_fits(dataclasses.replace(big, batch_size=512), 50_000, 10, (32, 32), t4)


def test_a_run_is_checked_against_its_devices_memory_before_anything_is_written(tmp_path, monkeypatch):
    checked = []

    def too_large(cfg, train_images, num_classes, image_shape, on):
        checked.append((cfg.arch, train_images, num_classes, tuple(image_shape), on))
        raise ConfigError("this run needs about 99.0 GiB")

    monkeypatch.setattr(probe, "check_fits", too_large)
    competition = make_competition(tmp_path / "input", per_class=4, n_test=3)
    with pytest.raises(ConfigError, match="99.0 GiB"):
        train_folds(TrainConfig(width=4, folds=2, epochs=1), competition, tmp_path / "run", competition / ".cache", CPU)
    assert checked == [("resnet18_cifar", 12, 3, (32, 32), CPU.device)]
    assert not (tmp_path / "run").exists()


def test_training_evaluates_and_predicts_in_the_runs_predict_batch(tmp_path, monkeypatch):
    from kaggle_cifar import train

    batches, real_stream, real_views = [], train.stream_probs, train.view_set_probs
    monkeypatch.setattr(train, "stream_probs", lambda *a, **k: batches.append(a[4]) or real_stream(*a, **k))
    monkeypatch.setattr(train, "view_set_probs", lambda *a, **k: batches.append(a[3]) or real_views(*a, **k))
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cfg = TrainConfig(folds=2, epochs=1, width=8, batch_size=4, image_size=64)
    train_folds(cfg, competition, tmp_path / "run", competition / ".cache", CPU)
    assert len(batches) == 2 * 2 and set(batches) == {cfg.predict_batch} == {512}  # each fold: its epoch, its OOF


def test_the_default_run_fits_a_16_gb_t4():
    full = probe.estimate_memory(TrainConfig(), train_images=50_000)
    assert full.total < 14 * 2**30  # of the T4's 15 GiB, leaving the CUDA context and workspaces room
    # ResNet18's weights and gradients, Muon's momentum, its float32 batches and 16-bit iterates, 4 bytes each
    assert full.weights == 6 * 4 * 11_173_962
    assert probe.estimate_memory(TrainConfig(optimizer="lookahead_muon"), 50_000).weights == 7 * 4 * 11_173_962  # + slow
    double = probe.estimate_memory(TrainConfig(batch_size=256), train_images=50_000)
    assert 1.9 < double.activations / full.activations < 2.1  # activations scale with the batch
    assert 250 * 2**20 < full.activations < 2 * 2**30  # 16-bit: about 300 MiB


def test_predict_reads_each_checkpoint_on_the_cpu(tmp_path, monkeypatch):
    from kaggle_cifar import checkpoint, inference
    from kaggle_cifar.rundir import RunDir

    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    cfg = TrainConfig(folds=2, epochs=1, width=4, batch_size=4)
    train_folds(cfg, competition, tmp_path / "run", competition / ".cache", CPU)
    seen = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, meta, device="cpu": seen.append(str(device)) or
                        real_load(path, meta, device))
    inference.load_fold_models(RunDir(tmp_path / "run"), cfg, ["cat", "dog", "frog"], CPU.policy)
    assert seen == ["cpu", "cpu"]


@pytest.mark.parametrize("optimizer, syncs", [("muon", "1"), ("sgd", "0")])
def test_the_doctor_on_a_t4_expects_the_loss_scalers_sync_only_with_an_unfused_optimizer(optimizer, syncs):
    """On a T4 (fp16) the default Muon waits once a step by design: the doctor passes it, and it
    would fail the same wait from fused SGD, whose inf check stays on the device."""
    from kaggle_cifar import doctor

    cfg = TrainConfig(width=4, batch_size=16, optimizer=optimizer, lr=0.01)
    data = doctor.synthetic_fold(64, torch.device("cpu"))
    x, y = data.train_images[:16].permute(0, 3, 1, 2).contiguous(), data.train_targets[:16]
    said = []
    verdicts = doctor.check_eager(doctor.Probe(cfg, FP16, data, x, y, steps=1), said.append)
    assert all(v.problem is None for v in verdicts), verdicts
    assert f"host syncs: {syncs} per training step, 0 per predict batch" in said


def test_doctor_passes_here_and_names_what_fails(tmp_path):
    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    proc = run_script("doctor.py", "--input", str(competition))
    assert proc.stdout.count("device cpu (") == 1 and "device cpu (" not in proc.stderr  # said once, in the report
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert len(verdicts) == 5 and all(line.startswith("ok ") for line in verdicts), proc.stdout
    for shown in ("compiled step: 1 graph(s), 0 graph break(s), 0 recompile(s)",
                  "host syncs: 0 per training step, 0 per predict batch", "input OK: 18 training images"):
        assert shown in proc.stdout
    assert re.search(r"the default run \(5 folds x 30 epochs, ResNet18 width 64\): about .+ here "
                     r"\((bf16 autocast|float32), [\d,]+ images/s\)", proc.stdout), proc.stdout
    for recipe in ("the fast recipe (--recipe fast:", "the wide fast recipe (--recipe fast_wide:"):
        assert re.search(re.escape(recipe) + r".*\): .+ an epoch here \((bf16 autocast|float32), [\d,]+ images/s\)",
                         proc.stdout), proc.stdout
    (competition / "test" / "2.png").write_bytes(b"not a png")  # the file check alone: the probes passed above
    verdict = doctor.check_files(competition, default_cache_dir(competition), say=lambda line: None)
    assert str(verdict).startswith("FAIL  competition files") and "2.png: not a readable PNG" in str(verdict)


def test_the_doctor_exits_1_when_a_check_fails_after_printing_every_verdict(monkeypatch, capsys):
    """The verdicts the checks return decide the exit code: one FAIL among them and the doctor
    exits 1 (a script or CI that runs it first stops there), every line printed all the same."""
    verdicts = [doctor.Verdict("device"), doctor.Verdict("competition files", "test/2.png: not a readable PNG")]
    monkeypatch.setattr(doctor, "run", lambda *args, **kwargs: verdicts)
    monkeypatch.setattr(sys, "argv", ["doctor.py"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "doctor.py"), run_name="__main__")
    assert exit_.value.code == 1
    assert capsys.readouterr().out.splitlines() == ["ok    device", "FAIL  competition files: test/2.png: not a readable PNG"]
