import argparse

import pytest
import torch

from kaggle_cifar.errors import CheckpointError
from kaggle_cifar.model import ResNet18Cifar, build_model, load_pretrained


def fresh(num_classes=3):
    torch.manual_seed(1)
    return build_model("resnet18_cifar", num_classes, 4)


def test_bare_state_dict_loads_all_but_the_mismatched_head(tmp_path):
    torch.manual_seed(0)
    source = ResNet18Cifar(num_classes=1000, width=4)  # e.g. a 1000-class pretrained network
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = fresh()
    head_before = model.network.head[2].weight.clone()
    load_pretrained(model, tmp_path / "weights.pth")
    torch.testing.assert_close(model.network.stem[0].weight, source.stem[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(model.network.stages[3][1].bn2.weight, source.stages[3][1].bn2.weight, rtol=0, atol=0)
    assert torch.equal(model.network.head[2].weight, head_before)  # 1000-class head: kept fresh


def test_earlier_runs_model_pt_loads_whole(tmp_path):
    source = fresh()
    torch.nn.init.normal_(source[1].head[2].weight)
    torch.save({"meta": {}, "model": source.state_dict()}, tmp_path / "model.pt")
    model = fresh()
    load_pretrained(model, tmp_path / "model.pt")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


def test_unrelated_or_unsafe_files_are_refused(tmp_path):
    torch.save({"something": torch.ones(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: no tensor matches this model"):
        load_pretrained(fresh(), tmp_path / "other.pth")
    torch.save({"model": {"w": ResNet18Cifar}}, tmp_path / "code.pth")  # a class: not plain data
    with pytest.raises(CheckpointError, match=r"code\.pth: refused"):
        load_pretrained(fresh(), tmp_path / "code.pth")
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": fresh().state_dict()}, tmp_path / "args.pth")
    with pytest.raises(CheckpointError) as refused:
        load_pretrained(fresh(), tmp_path / "args.pth")
    assert "\x1b" not in str(refused.value)  # torch's message carries terminal escape codes
    assert "it holds a argparse.Namespace object, not only tensors" in str(refused.value)
    assert "save the weights alone, torch.save(model.state_dict(), PATH)" in str(refused.value)


def test_weights_of_another_width_are_refused_not_half_loaded(tmp_path):
    """Only buffers and biases would match (BatchNorm counters, the input layer's mean and std, the
    head's bias): training would go on from random weights."""
    torch.save(build_model("resnet18_cifar", 10, 8).state_dict(), tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match=r"wider\.pth: none of this model's 21 conv and linear weights matches"):
        load_pretrained(fresh(), tmp_path / "wider.pth")


def test_training_starts_every_fold_from_the_pretrained_weights(tmp_path, caplog):
    import dataclasses

    from conftest import make_competition
    from kaggle_cifar import distributed
    from kaggle_cifar.config import TrainConfig
    from kaggle_cifar.cv import train_folds

    competition = make_competition(tmp_path / "input", per_class=6, n_test=3)
    source = fresh()
    torch.nn.init.normal_(source[1].stem[0].weight)
    torch.save(source[1].state_dict(), tmp_path / "weights.pth")
    cfg = TrainConfig(folds=2, epochs=1, width=4, batch_size=4, lr=1e-9, pretrained=str(tmp_path / "weights.pth"))
    with caplog.at_level("INFO"):
        train_folds(cfg, competition, tmp_path / "run", competition / ".cache", distributed.setup("cpu"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained ")]
    assert len(said) == 1 and "weights.pth: 122 of 124 tensors loaded" in said[0], said  # once for both folds
    for fold in (0, 1):
        trained = torch.load(tmp_path / "run" / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        torch.testing.assert_close(trained["1.stem.0.weight"], source[1].stem[0].weight, rtol=0, atol=1e-6)
    unseeded = dataclasses.replace(cfg, pretrained="")
    train_folds(unseeded, competition, tmp_path / "plain", competition / ".cache", distributed.setup("cpu"))
    plain = torch.load(tmp_path / "plain" / "fold0" / "model.pt", weights_only=True)["model"]
    assert not torch.allclose(plain["1.stem.0.weight"], source[1].stem[0].weight, atol=1e-3)


def test_a_resnet_family_member_starts_from_imagenet_shaped_weights_and_predicts(tmp_path):
    from conftest import train_and_predict_from_random_timm_weights

    # SGD: Muon's orthogonalisation of ResNet34's 512-channel convs took 2.4 s a step on one thread
    imagenet, run, proc = train_and_predict_from_random_timm_weights(tmp_path, "resnet34", "--arch", "resnet34_cifar",
                                                                     "--epochs", "1", "--lr", "1e-9", "--optimizer", "sgd")
    assert "kept fresh: 0.mean, 0.std, 1.conv1.weight, 1.fc.bias, 1.fc.weight" in proc.stderr  # 7x7 stem, 1000 classes
    trained = torch.load(run / "fold0" / "model.pt", weights_only=True)["model"]
    torch.testing.assert_close(trained["1.layer3.0.conv1.weight"], imagenet.layer3[0].conv1.weight, rtol=0, atol=1e-6)
