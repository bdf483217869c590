"""The networks of the notes, each a small table of layers plus one builder.

A table row is a tuple naming a layer kind and its numbers:
    ("conv", out_channels, kernel, stride, padding[, groups])
                                                      conv [+ batch norm] + activation; groups (default 1) is never divided by ratio
    ("max" | "avg", kernel, stride[, padding])        pooling
    ("nin", out_channels, kernel, stride, padding)    NiN block: that conv, then two 1x1 convs, each + ReLU
    ("inception", c1, (c2a, c2b), (c3a, c3b), c4)     GoogLeNet's four parallel paths, concatenated
    ("residual", out_channels, stride)                ResNet's basic block (1x1 shortcut when the shape changes)
    ("dense", num_convs, growth)                      DenseNet block: BN-ReLU-conv layers, each input concatenated
    ("transition",)                                   DenseNet transition: BN-ReLU-1x1 conv halving channels, 2x2 avg-pool
    ("bn_relu",) | ("gap",) | ("dropout", p)
A list of rows is a block (one nn.Sequential, as the notes print VGG, GoogLeNet and ResNet per block).
Channel widths are divided by `ratio` (CLASSES is never divided); the classifier's hidden widths are
not (the d2l VGG exercise shrinks only the convolutions). The first linear layer takes whatever the
features produce at the chosen resize, as MXNet's lazily sized Dense does in the notes, so AlexNet at
224 px gets the notes' 6400 inputs.

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
CLASSES = "classes"  # a width that is the number of classes, never divided by ratio


INITS = ("xavier", "kaiming")  # weight inits build_model knows: the notes' Xavier, He (kaiming)


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
    batch_norm: bool = False  # batch norm after every conv and hidden linear layer (LeNet-BN)
    head: bool = True         # False: the features already end in the class scores (NiN)


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
        # d2l 7.5: LeNet with batch norm after every conv and hidden linear layer (and no first-conv padding).
        Architecture(
            name="lenet_bn",
            features=(("conv", 6, 5, 1, 0), ("avg", 2, 2), ("conv", 16, 5, 1, 0), ("avg", 2, 2)),
            hidden=(120, 84), activation=nn.Sigmoid, dropout=0.0, batch_norm=True,
            min_resize=16, default_resize=28, lr=1.0, epochs=10, batch_size=256,
        ),
        Architecture(
            name="nin",
            features=(
                ("nin", 96, 11, 4, 0), ("max", 3, 2),
                ("nin", 256, 5, 1, 2), ("max", 3, 2),
                ("nin", 384, 3, 1, 1), ("max", 3, 2), ("dropout", 0.5),
                ("nin", CLASSES, 3, 1, 1), ("gap",),
            ),
            hidden=(), activation=nn.ReLU, dropout=0.0, head=False,
            min_resize=67, default_resize=224, lr=0.1, epochs=10, batch_size=128,
        ),
        Architecture(
            name="googlenet",
            features=(
                [("conv", 64, 7, 2, 3), ("max", 3, 2, 1)],
                [("conv", 64, 1, 1, 0), ("conv", 192, 3, 1, 1), ("max", 3, 2, 1)],
                [("inception", 64, (96, 128), (16, 32), 32), ("inception", 128, (128, 192), (32, 96), 64), ("max", 3, 2, 1)],
                [("inception", 192, (96, 208), (16, 48), 64), ("inception", 160, (112, 224), (24, 64), 64),
                 ("inception", 128, (128, 256), (24, 64), 64), ("inception", 112, (144, 288), (32, 64), 64),
                 ("inception", 256, (160, 320), (32, 128), 128), ("max", 3, 2, 1)],
                [("inception", 256, (160, 320), (32, 128), 128), ("inception", 384, (192, 384), (48, 128), 128), ("gap",)],
            ),
            hidden=(), activation=nn.ReLU, dropout=0.0,
            # Padded pools never vanish; below its total stride of 32 the later stages see padding only.
            min_resize=32, default_resize=96, lr=0.1, epochs=10, batch_size=128,
        ),
        Architecture(
            name="resnet18",
            features=(
                [("conv", 64, 7, 2, 3), ("max", 3, 2, 1)],
                [("residual", 64, 1), ("residual", 64, 1)],
                [("residual", 128, 2), ("residual", 128, 1)],
                [("residual", 256, 2), ("residual", 256, 1)],
                [("residual", 512, 2), ("residual", 512, 1)],
                ("gap",),
            ),
            hidden=(), activation=nn.ReLU, dropout=0.0, batch_norm=True,
            min_resize=32, default_resize=96, lr=0.05, epochs=10, batch_size=256,  # total stride 32, as GoogLeNet
        ),
        Architecture(
            name="densenet",
            features=(
                [("conv", 64, 7, 2, 3), ("max", 3, 2, 1)],
                ("dense", 4, 32), ("transition",), ("dense", 4, 32), ("transition",),
                ("dense", 4, 32), ("transition",), ("dense", 4, 32),
                ("bn_relu",), ("gap",),
            ),
            hidden=(), activation=nn.ReLU, dropout=0.0, batch_norm=True,
            min_resize=29, default_resize=96, lr=0.1, epochs=10, batch_size=256,
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


def check_init(init: str) -> None:
    """Refuse, before any training, a weight init build_model does not know."""
    if init not in INITS:
        raise ValueError(f"init must be {' or '.join(INITS)}; got {init!r}")


class Inception(nn.Module):
    """GoogLeNet's block: 1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max-pool then 1x1; concatenated."""

    def __init__(self, in_channels: int, c1: int, c2: tuple[int, int], c3: tuple[int, int], c4: int):
        super().__init__()
        self.p1 = nn.Sequential(nn.Conv2d(in_channels, c1, 1), nn.ReLU())
        self.p2 = nn.Sequential(nn.Conv2d(in_channels, c2[0], 1), nn.ReLU(), nn.Conv2d(c2[0], c2[1], 3, padding=1), nn.ReLU())
        self.p3 = nn.Sequential(nn.Conv2d(in_channels, c3[0], 1), nn.ReLU(), nn.Conv2d(c3[0], c3[1], 5, padding=2), nn.ReLU())
        self.p4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(in_channels, c4, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.p1(x), self.p2(x), self.p3(x), self.p4(x)], dim=1)


class Residual(nn.Module):
    """ResNet's basic block: two 3x3 conv + BN, added to the input (through a 1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.bn1, self.bn2 = nn.BatchNorm2d(out_channels), nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride) if stride != 1 or in_channels != out_channels else None

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class DenseBlock(nn.Module):
    """DenseNet's block: each BN-ReLU-3x3 conv sees the concatenation of the input and all earlier outputs."""

    def __init__(self, in_channels: int, num_convs: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(in_channels + i * growth), nn.ReLU(), nn.Conv2d(in_channels + i * growth, growth, 3, padding=1))
            for i in range(num_convs)
        )

    def forward(self, x):
        for conv in self.convs:
            x = torch.cat([x, conv(x)], dim=1)
        return x


def _width(channels, ratio: int) -> int:
    if channels == CLASSES:
        return NUM_CLASSES
    if channels // ratio < 1:
        raise ValueError(f"ratio {ratio} leaves a layer of {channels} channels with none; use a ratio <= {channels}")
    return channels // ratio


# One builder per row kind: (input channels, ratio, architecture, the row's numbers) -> (layers, output channels).
def _conv(in_channels: int, ratio: int, arch: Architecture, channels, kernel: int, stride: int, padding: int, groups: int = 1):
    out = _width(channels, ratio)
    batch_norm = [nn.BatchNorm2d(out)] if arch.batch_norm else []
    return [nn.Conv2d(in_channels, out, kernel, stride, padding, groups=groups), *batch_norm, arch.activation()], out


def _pool(pool: type[nn.Module]):
    def build(in_channels: int, ratio: int, arch: Architecture, *numbers: int):
        return [pool(*numbers)], in_channels
    return build


def _nin(in_channels: int, ratio: int, arch: Architecture, channels, kernel: int, stride: int, padding: int):
    out = _width(channels, ratio)
    return [nn.Sequential(nn.Conv2d(in_channels, out, kernel, stride, padding), nn.ReLU(),
                          nn.Conv2d(out, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1), nn.ReLU())], out


def _inception(in_channels: int, ratio: int, arch: Architecture, c1, c2: tuple, c3: tuple, c4):
    widths = (_width(c1, ratio), tuple(_width(c, ratio) for c in c2), tuple(_width(c, ratio) for c in c3), _width(c4, ratio))
    return [Inception(in_channels, *widths)], widths[0] + widths[1][1] + widths[2][1] + widths[3]


def _residual(in_channels: int, ratio: int, arch: Architecture, channels, stride: int):
    out = _width(channels, ratio)
    return [Residual(in_channels, out, stride)], out


def _dense(in_channels: int, ratio: int, arch: Architecture, num_convs: int, growth):
    growth = _width(growth, ratio)
    return [DenseBlock(in_channels, num_convs, growth)], in_channels + num_convs * growth


def _transition(in_channels: int, ratio: int, arch: Architecture):
    out = in_channels // 2
    return [nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out, 1), nn.AvgPool2d(2, 2))], out


def _bn_relu(in_channels: int, ratio: int, arch: Architecture):
    return [nn.BatchNorm2d(in_channels), nn.ReLU()], in_channels


def _gap(in_channels: int, ratio: int, arch: Architecture):
    return [nn.AdaptiveAvgPool2d((1, 1))], in_channels


def _dropout(in_channels: int, ratio: int, arch: Architecture, p: float):
    return [nn.Dropout(p)], in_channels


# The row kinds an architecture table may use (the module docstring gives each one's numbers).
LAYER_KINDS = {
    "conv": _conv, "max": _pool(nn.MaxPool2d), "avg": _pool(nn.AvgPool2d), "nin": _nin, "inception": _inception,
    "residual": _residual, "dense": _dense, "transition": _transition, "bn_relu": _bn_relu, "gap": _gap, "dropout": _dropout,
}


def _make_layers(rows: tuple | list, in_channels: int, ratio: int, arch: Architecture) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for row in rows:
        if isinstance(row, list):  # a block: its rows become one nn.Sequential
            block, in_channels = _make_layers(row, in_channels, ratio, arch)
            layers.append(nn.Sequential(*block))
            continue
        kind, *numbers = row
        if kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {kind!r} in an architecture table; choose one of {', '.join(LAYER_KINDS)}")
        built, in_channels = LAYER_KINDS[kind](in_channels, ratio, arch, *numbers)
        layers += built
    return layers, in_channels


def _gain_name(activation: type[nn.Module]) -> str:
    """The activation's name as nn.init.calculate_gain knows it (nn.ReLU: "relu"); an error for one it does not know,
    since He init with another activation's gain would mis-scale every layer without a word."""
    name = activation.__name__.lower()
    try:
        nn.init.calculate_gain(name)
    except ValueError:
        raise ValueError(f"init kaiming needs the gain of {activation.__name__}, which torch.nn.init.calculate_gain does not know; "
                         "use init xavier, or an activation it knows (ReLU, Sigmoid, Tanh, SELU)") from None
    return name


def build_model(arch: str, resize: int | None = None, ratio: int = 1, init: str = "xavier") -> nn.Sequential:
    """The network for a single-channel `resize` x `resize` input and 10 classes.

    init "xavier" is the notes' (d2l's init_weights: Xavier-uniform weights, default biases). "kaiming"
    (He-uniform weights with the gain of the architecture's activation, zero biases) keeps the signal's
    scale through ReLU layers: without batch norm, Xavier halves its variance at every ReLU, so VGG-11,
    AlexNet, NiN and GoogLeNet start with vanishing gradients and sit on a loss plateau for hundreds of
    steps, which a short CPU budget cannot afford (benchmarks/RESULTS.md).
    """
    check_init(init)
    spec = get_architecture(arch)
    resize = spec.default_resize if resize is None else resize
    check_resize(arch, resize)
    nonlinearity = _gain_name(spec.activation) if init == "kaiming" else None
    if ratio < 1:
        raise ValueError(f"ratio must be a positive integer channel divisor; got {ratio}")
    features, _ = _make_layers(spec.features, 1, ratio, spec)
    # The flattened width depends on the resize; a copy on the meta device finds it without computing anything.
    with torch.device("meta"):
        probe, _ = _make_layers(spec.features, 1, ratio, spec)
        flat = nn.Sequential(*probe).eval()(torch.zeros(1, 1, resize, resize)).numel()  # eval: batch norm takes a batch of 1
    classifier: list[nn.Module] = [nn.Flatten()]
    for width in spec.hidden if spec.head else ():
        classifier += [nn.Linear(flat, width), *([nn.BatchNorm1d(width)] if spec.batch_norm else []), spec.activation()]
        if spec.dropout:
            classifier.append(nn.Dropout(spec.dropout))
        flat = width
    if spec.head:
        classifier.append(nn.Linear(flat, NUM_CLASSES))
    net = nn.Sequential(*features, *classifier)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_uniform_(module.weight, nonlinearity=nonlinearity)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return net


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
