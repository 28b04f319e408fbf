"""Models the CLI can build: small ones for the digits data and torchvision architectures.

Weights are never downloaded: torchvision models are built with ``weights=None``; trained weights come
only from a local file (``prunekit run --dense PATH``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn

from prunekit.errors import PrunekitError


@attrs.frozen
class ModelSpec:
    """How to build one model and the input it expects (channels, height, width)."""

    name: str
    input_shape: tuple[int, int, int]
    build: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model
    description: str = ""


class LeNet(nn.Module):
    """LeNet-style CNN of the Han/iterative-pruning seed (TF MNIST tutorial net), 28x28 inputs.

    conv5x5(32)+ReLU, maxpool2, conv5x5(64)+ReLU, maxpool2, fc 3136->1024 + ReLU, dropout, fc 1024->classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 7 * 7, 1024)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.drop(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + idt)


class ResNetDigits(nn.Module):
    """A small residual CNN for 16x16 inputs: stem 32, stages 32/64/128 (one BasicBlock each), fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _torchvision(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise PrunekitError(f"{name} takes 3-channel images; the data loader replicates gray images to 3 channels")
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec("lenet", (1, 28, 28), lambda c, i: LeNet(c, i), "LeNet-style CNN (Han seed), 3.3M weights"),
    "resnet-digits": ModelSpec(
        "resnet-digits", (1, 16, 16), lambda c, i: ResNetDigits(c, i), "small residual CNN, 32/64/128 channels"
    ),
}
for _tv in ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "alexnet", "mobilenet_v2"):
    MODELS[_tv] = ModelSpec(_tv, (3, 224, 224), _torchvision(_tv), f"torchvision {_tv} (random init, no download)")


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise PrunekitError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}") from None


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    spec = model_spec(name)
    channels = (input_shape or spec.input_shape)[0]
    return spec.build(num_classes, channels)
