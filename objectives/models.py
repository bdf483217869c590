"""The networks of the notes, each a small table of layers plus one builder.

A table row is a tuple: ("conv", out_channels, kernel, stride, padding),
("max", kernel, stride) or ("avg", kernel, stride). A list of rows is a block
(built as one nn.Sequential, as the VGG notes print per block). Conv widths are
divided by `ratio`; the classifier's hidden widths are not (the d2l VGG
exercise shrinks only the convolutions). The first linear layer takes whatever
the features produce at the chosen resize, as MXNet's lazily sized Dense does
in the notes, so AlexNet at 224 px gets the notes' 6400 inputs.

Example:
    >>> net = build_model("vgg11", resize=224, ratio=4)
    >>> net(torch.zeros(2, 1, 224, 224)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NUM_CLASSES = 10


class InputTooSmallError(ValueError):
    """The requested resize is below what the architecture accepts."""


@dataclass(frozen=True)
class Architecture:
    name: str
    features: tuple          # table rows and blocks, see the module docstring
    hidden: tuple[int, ...]  # widths of the hidden linear layers
    activation: type[nn.Module]
    dropout: float           # after each hidden linear layer; 0 means none
    min_resize: int          # smallest input side whose feature map is still >= 1x1
    default_resize: int      # the resize the notes train at
    lr: float                # the notes' learning rate
    epochs: int              # the notes' epoch count
    batch_size: int          # the notes' batch size


def _vgg_features(conv_arch: tuple[tuple[int, int], ...]) -> tuple:
    # One block per (num_convs, out_channels): 3x3 convs keeping the size, then a 2x2 max-pool.
    return tuple([("conv", channels, 3, 1, 1)] * num_convs + [("max", 2, 2)] for num_convs, channels in conv_arch)


VGG11_CONV_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
# AlexNet after its first conv and pool; the 28-px variant differs only before this.
_ALEXNET_REST = (
    ("conv", 256, 5, 1, 2), ("max", 3, 2),
    ("conv", 384, 3, 1, 1), ("conv", 384, 3, 1, 1), ("conv", 256, 3, 1, 1), ("max", 3, 2),
)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="lenet",
            features=(("conv", 6, 5, 1, 2), ("avg", 2, 2), ("conv", 16, 5, 1, 0), ("avg", 2, 2)),
            hidden=(120, 84), activation=nn.Sigmoid, dropout=0.0,
            min_resize=12, default_resize=28, lr=0.9, epochs=10, batch_size=256,
        ),
        Architecture(
            name="alexnet",
            features=(("conv", 96, 11, 4, 1), ("max", 3, 2), *_ALEXNET_REST),
            hidden=(4096, 4096), activation=nn.ReLU, dropout=0.5,
            min_resize=65, default_resize=224, lr=0.01, epochs=10, batch_size=128,
        ),
        # Note 004: a 5x5 stride-1 first conv and a stride-1 first pool let 28x28 inputs
        # reach the same 256x5x5 = 6400 features as the 224 px original.
        Architecture(
            name="alexnet_28",
            features=(("conv", 96, 5, 1, 2), ("max", 3, 1), *_ALEXNET_REST),
            hidden=(4096, 4096), activation=nn.ReLU, dropout=0.5,
            min_resize=9, default_resize=28, lr=0.01, epochs=20, batch_size=128,
        ),
        Architecture(
            name="vgg11",
            features=_vgg_features(VGG11_CONV_ARCH),
            hidden=(4096, 4096), activation=nn.ReLU, dropout=0.5,
            min_resize=32, default_resize=224, lr=0.05, epochs=10, batch_size=128,
        ),
    )
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def check_resize(arch: str, resize: int) -> None:
    """Refuse, before any training, an input smaller than the architecture accepts."""
    minimum = get_architecture(arch).min_resize
    if resize < minimum:
        raise InputTooSmallError(f"{arch} needs resize >= {minimum} (its feature maps vanish below that); got {resize}")


def _make_layers(rows: tuple | list, in_channels: int, ratio: int, activation: type[nn.Module]) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for row in rows:
        if isinstance(row, list):
            block, in_channels = _make_layers(row, in_channels, ratio, activation)
            layers.append(nn.Sequential(*block))
        elif row[0] == "conv":
            _, channels, kernel, stride, padding = row
            out_channels = channels // ratio
            if out_channels < 1:
                raise ValueError(f"ratio {ratio} leaves a conv layer of {channels} channels with none; use a ratio <= {channels}")
            layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding), activation()]
            in_channels = out_channels
        elif row[0] == "max":
            layers.append(nn.MaxPool2d(row[1], row[2]))
        elif row[0] == "avg":
            layers.append(nn.AvgPool2d(row[1], row[2]))
        else:
            raise ValueError(f"unknown layer kind {row[0]!r} in an architecture table")
    return layers, in_channels


def build_model(arch: str, resize: int | None = None, ratio: int = 1) -> nn.Sequential:
    """The network for a single-channel `resize` x `resize` input and 10 classes, Xavier-initialised."""
    spec = get_architecture(arch)
    resize = spec.default_resize if resize is None else resize
    check_resize(arch, resize)
    if ratio < 1:
        raise ValueError(f"ratio must be a positive integer channel divisor; got {ratio}")
    features, _ = _make_layers(spec.features, 1, ratio, spec.activation)
    # The flattened width depends on the resize; a copy on the meta device finds it without computing anything.
    with torch.device("meta"):
        probe, _ = _make_layers(spec.features, 1, ratio, spec.activation)
        flat = nn.Sequential(*probe)(torch.zeros(1, 1, resize, resize)).numel()
    classifier: list[nn.Module] = [nn.Flatten()]
    for width in spec.hidden:
        classifier += [nn.Linear(flat, width), spec.activation()]
        if spec.dropout:
            classifier.append(nn.Dropout(spec.dropout))
        flat = width
    classifier.append(nn.Linear(flat, NUM_CLASSES))
    net = nn.Sequential(*features, *classifier)
    # d2l's init_weights: Xavier-uniform weights for every conv and linear layer, default biases.
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
    return net


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
