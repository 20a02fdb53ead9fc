"""Prediction with the models compiled for inference (inductor, weights frozen): what the CPU does
by default for a large image set."""

from __future__ import annotations

import logging

import torch

from kaggle_cifar import probe
from kaggle_cifar.device import COMPILE_MIN_FORWARDS, Policy
from kaggle_cifar.inference import FrozenForward, for_inference, view_set_probs
from kaggle_cifar.model import build_model

# float32 where a test compares the compiled graph's numbers with eager ones: under bf16 autocast (a
# CPU with AVX-512 BF16 or AMX) the two round differently, by up to 0.007 in a probability.
CPU = Policy.of(torch.device("cpu"), "float32")


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18_cifar", 10, 8, 0, torch.full((3,), 120.0), torch.full((3,), 60.0))
    for m in model.modules():  # BatchNorm statistics of a trained model, so that folding them in is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.to(memory_format=torch.channels_last).eval()


def test_a_compiled_model_predicts_every_view_and_a_short_last_batch_with_one_graph():
    model = small_model(0)
    images = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8)  # 2 batches of 128 and 44 left over
    probe.reset_compile_counts()
    compiled = view_set_probs([FrozenForward(model, 128, CPU).eval()], images, CPU, batch_size=128)
    counts = probe.compile_counts()
    eager = view_set_probs([model], images, CPU, batch_size=128)
    assert counts.clean, counts  # padded to one shape, one layout: no recompile for a view or the tail
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-3)


def test_a_compiler_that_fails_leaves_the_prediction_to_the_eager_model(monkeypatch, caplog):
    def no_compiler(model, **kwargs):
        def fail(*args):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = small_model(1)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING):
        probs = view_set_probs([FrozenForward(model, 16, CPU).eval()], images, CPU, batch_size=16)
    assert "compiling the model for inference failed (InductorError: no C++ compiler found)" in caplog.text
    torch.testing.assert_close(probs["flip"], view_set_probs([model], images, CPU, batch_size=16)["flip"])


def test_only_a_large_set_on_the_cpu_is_compiled_by_default_and_the_flag_decides_everywhere():
    models = [small_model(2)]
    cpu, gpu = Policy.of(torch.device("cpu")), Policy(torch.device("cuda", 0), torch.bfloat16, torch.bfloat16)
    assert for_inference(models, cpu, COMPILE_MIN_FORWARDS - 1, 128) is models
    assert isinstance(for_inference(models, cpu, COMPILE_MIN_FORWARDS, 128)[0], FrozenForward)
    assert for_inference(models, gpu, 10 * COMPILE_MIN_FORWARDS, 128) is models
    assert isinstance(for_inference(models, Policy.of(torch.device("cpu"), compile=True), 10, 128)[0], FrozenForward)
    assert for_inference(models, Policy.of(torch.device("cpu"), compile=False), 10 * COMPILE_MIN_FORWARDS, 128) is models
