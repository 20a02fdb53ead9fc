"""Models: the CIFAR-stem ResNet18 (default) or any timm architecture, behind a uint8 input layer
that standardises and, for networks pretrained at another resolution, resizes."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from kaggle_cifar import checkpoint
from kaggle_cifar.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)


CHANNELS = 3  # the data layer refuses anything but RGB
# The per-channel pixel mean and std (0-255) that torchvision's and timm's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class InputLayer(nn.Module):
    """uint8 NCHW images in, standardised float out, resized (bilinear, the whole batch at once) to
    `image_size` when it is not 0. Being part of the model, the resize applies alike in training,
    evaluation, TTA and predict, after the augmentation has worked on the small images. mean/std are
    buffers, so they travel with the checkpoint and predict needs nothing but the weights."""

    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None, image_size: int = 0):
        super().__init__()
        self.register_buffer("mean", (torch.zeros(CHANNELS) if mean is None else mean).reshape(1, -1, 1, 1).float())
        self.register_buffer("std", (torch.ones(CHANNELS) if std is None else std).reshape(1, -1, 1, 1).float())
        self.image_size = image_size
        self.channels_last = True  # the layout of the uint8 batches it is given; Policy.place may say otherwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        if not self.channels_last:
            x = x.contiguous()
        if self.image_size and x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=x.shape[-1] > self.image_size)
        return x


def _stage(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, stride, downsample), BasicBlock(planes, planes))


class ResNet18Cifar(nn.Module):
    """ResNet18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep
    their resolution into the first stage. timm's ResNet hard-wires a 64-channel stem, hence this
    assembly of torchvision's BasicBlock with a free base width."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_stage(w[0], w[0], 1), _stage(w[0], w[1], 2), _stage(w[1], w[2], 2), _stage(w[2], w[3], 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[3], num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.stages.modules():
            if isinstance(block, BasicBlock):
                nn.init.zeros_(block.bn2.weight)  # each residual block starts as identity

    def whiten_stem(self, images: torch.Tensor) -> None:
        """The first conv starts as fast_cifar's does, whitening the training images' 3x3 patches:
        up to 27 eigenvector pairs, the filters beyond them (width > 54) as they were."""
        conv, side = self.stem[0], self.stem[0].kernel_size[0]
        filters = whitening_filters(images, side, min(conv.out_channels, 2 * CHANNELS * side ** 2) // 2 * 2)
        with torch.no_grad():
            conv.weight[:len(filters)] = filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))

    def get_classifier(self) -> nn.Module:  # timm's name for it, so that every arch answers alike
        return self.head[-1]


class FastCifar(nn.Module):
    """A fast CIFAR network in the manner of airbench (Keller Jordan's cifar10-airbench), written
    from its published description: a frozen 2x2 first conv initialised to whiten the training
    images' patches, then three groups of conv-pool-BN-GELU-conv-BN-GELU (64, 256, 256 channels at
    width 64), a global max-pool and a linear head whose logits are scaled down. Much less compute
    per image than ResNet18, for the best accuracy per hour."""

    PATCH = 2

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        widths = [width, 4 * width, 4 * width]
        self.whiten = nn.Conv2d(CHANNELS, 2 * CHANNELS * self.PATCH ** 2, self.PATCH)
        self.whiten.weight.requires_grad_(False)  # set from the data, then fixed; its bias trains
        layers, inplanes = [nn.GELU()], self.whiten.out_channels
        for planes in widths:
            layers += [nn.Conv2d(inplanes, planes, 3, padding=1, bias=False), nn.MaxPool2d(2), _bn(planes), nn.GELU(),
                       nn.Conv2d(planes, planes, 3, padding=1, bias=False), _bn(planes), nn.GELU()]
            inplanes = planes
        self.groups = nn.Sequential(*layers)
        self.head = nn.Linear(inplanes, num_classes, bias=False)
        for m in self.groups.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels:
                # each group's second conv starts close to the identity on half its channels
                nn.init.dirac_(m.weight[: m.in_channels // 2])

    def init_from_data(self, images: torch.Tensor) -> None:
        """Whitening: the first conv's filters are set from the training images' 2x2 patches."""
        with torch.no_grad():
            self.whiten.weight.copy_(whitening_filters(images, self.PATCH, self.whiten.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.whiten(x))
        return self.head(x.amax((2, 3))) / 9  # small logits at the start: airbench's output scale

    def get_classifier(self) -> nn.Module:
        return self.head


def whitening_filters(images: torch.Tensor, patch: int, count: int, eps: float = 5e-4) -> torch.Tensor:
    """`count` conv filters (count/2 pairs) that whiten the images' `patch` x `patch` patches:
    the eigenvectors of the patches' covariance with the largest eigenvalues, each scaled by the
    inverse square root of its eigenvalue, and their negatives (airbench's first layer). The
    images are uint8 NHWC, standardised per channel as the model sees them; 5,000 of them suffice."""
    x = images[:5000].permute(0, 3, 1, 2).float()
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    patches = x.unfold(2, patch, 1).unfold(3, patch, 1)  # N, C, H', W', p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, CHANNELS * patch ** 2).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
    top = slice(len(eigenvalues) - count // 2, None)
    filters = (eigenvectors.T[top] / (eigenvalues[top] + eps).sqrt()[:, None]).reshape(-1, CHANNELS, patch, patch)
    return torch.cat([filters, -filters]).float()


def _bn(planes: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(planes, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)  # scale fixed at 1, shift trained, as airbench does
    return bn


def timm_with_cifar_stem(name: str, num_classes: int, width: int) -> nn.Module:
    """timm's `name` with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool, so a 32x32
    image keeps its resolution into the first stage; everything else is timm's (its widths too)."""
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    net.conv1 = nn.Conv2d(CHANNELS, net.conv1.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


CIFAR_STEM_FAMILY = ("resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")
# Built here, by name; any other name is timm's own model. `width` scales the first two only.
ARCHS = {"resnet18_cifar": ResNet18Cifar, "fast_cifar": FastCifar,
         **{f"{name}_cifar": functools.partial(timm_with_cifar_stem, name) for name in CIFAR_STEM_FAMILY}}
SCALABLE_ARCHS = ("resnet18_cifar", "fast_cifar")


class Classifier(nn.Sequential):
    """An InputLayer, then the network, whose classifier head is its last layer. A Sequential, so
    that the state dict's names (`0.mean`, `1.stem.0.weight`, ...) are those of every checkpoint
    this project has written; its parts are reached by name."""

    @property
    def input(self) -> InputLayer:
        return self[0]

    @property
    def network(self) -> nn.Module:
        return self[1]

    @property
    def head(self) -> nn.Module:
        return self[1].get_classifier()


def build_model(arch: str, num_classes: int, width: int, image_size: int = 0, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None) -> Classifier:
    """The network behind an InputLayer. A fresh model takes the per-channel mean and std it is to
    standardise with; a model about to load a checkpoint needs neither (its buffers come with it)."""
    if arch in ARCHS:
        net = ARCHS[arch](num_classes, width)
    else:
        import timm

        net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return Classifier(InputLayer(mean, std, image_size), net)


def for_config(cfg, num_classes: int, data_mean: torch.Tensor | None = None,
               data_std: torch.Tensor | None = None) -> Classifier:
    """The network a TrainConfig names. A fresh model standardises with the training images' mean
    and std (`data_*`) or ImageNet's, as --normalization says; a model about to load a checkpoint
    needs neither."""
    if cfg.normalization == "imagenet" or (cfg.normalization == "auto" and cfg.pretrained):
        data_mean, data_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return build_model(cfg.arch, num_classes, cfg.width, cfg.image_size, data_mean, data_std)


def check_forward(cfg, num_classes: int, image_shape: tuple[int, int]) -> None:
    """The config's network takes the competition's images: one forward pass of two of them, before
    any work (a timm network built for 224x224 images fails on 32x32 ones without --image-size)."""
    model = for_config(cfg, num_classes).eval()
    x = torch.zeros(2, CHANNELS, *image_shape, dtype=torch.uint8)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # whatever the network's own checks raise
        raise ConfigError(f"--arch {cfg.arch}: fails on a {image_shape[0]}x{image_shape[1]} image "
                          f"({first_line(e, typed=True)}); a network made for another size needs --image-size, "
                          f"e.g. --image-size 224") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"--arch {cfg.arch}: gives outputs of shape {tuple(out.shape)} for 2 images, not (2, "
                          f"{num_classes}) class scores")


def load_pretrained(model: nn.Sequential, path: Path) -> None:
    """Initialise `model` (as built by build_model) from a local weights file, read with
    `weights_only=True`: a plain state dict (timm, torchvision), or an earlier run's `model.pt`.
    Tensors are matched by name and shape, so a 1000-class head or a 7x7 ImageNet stem is skipped."""
    state = checkpoint.read(path)
    inner = state.get("model", state.get("state_dict")) if isinstance(state, dict) else None
    if isinstance(inner, dict):  # a checkpoint wrapping its weights
        state = inner
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    own = model.state_dict()
    matched = {}
    for name, tensor in state.items():
        target = name if name in own else f"1.{name}"  # a bare network's names sit under our input layer
        if target in own and isinstance(tensor, torch.Tensor) and own[target].shape == tensor.shape:
            matched[target] = tensor
    if not matched:
        raise CheckpointError(f"{path}: no tensor matches this model by name and shape")
    weights = [name for name, p in model.named_parameters() if p.ndim >= 2]  # conv and linear weights
    if not any(name in matched for name in weights):
        raise CheckpointError(f"{path}: none of this model's {len(weights)} conv and linear weights matches the "
                              f"file by name and shape (only {len(matched)} buffers or biases did): weights of "
                              f"another architecture or --width?")
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(own) - set(matched))
    said = (f"pretrained {path}: {len(matched)} of {len(own)} tensors loaded; kept fresh: "
            + ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    if said not in _PRETRAINED_SAID:
        log.info(said)
        _PRETRAINED_SAID.add(said)


# What load_pretrained has logged in this process: the calibration and every fold load the same
# file into the same model, and one line says it for all of them.
_PRETRAINED_SAID: set[str] = set()


def training_flops_per_image(model: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """Forward + backward FLOPs of one image (3x the forward count), from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *image_shape, dtype=torch.uint8, device=next(model.parameters()).device))
    return 3.0 * counter.get_total_flops()
