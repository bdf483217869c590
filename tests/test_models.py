"""Layer output shapes against those printed in the notes (../shared/seeds), minimum inputs, parameter counts."""

import pytest
import torch

from objectives.models import ARCHITECTURES, InputTooSmallError, build_model, parameter_count

# (layer class name, output shape) as the notes print them for a 1x1xRxR input.
LENET_28 = [
    ("Conv2d", (6, 28, 28)), ("Sigmoid", (6, 28, 28)), ("AvgPool2d", (6, 14, 14)),
    ("Conv2d", (16, 10, 10)), ("Sigmoid", (16, 10, 10)), ("AvgPool2d", (16, 5, 5)),
    ("Flatten", (400,)), ("Linear", (120,)), ("Sigmoid", (120,)), ("Linear", (84,)), ("Sigmoid", (84,)), ("Linear", (10,)),
]
_ALEXNET_TAIL = [
    ("Conv2d", (384, 12, 12)), ("ReLU", (384, 12, 12)), ("Conv2d", (384, 12, 12)), ("ReLU", (384, 12, 12)),
    ("Conv2d", (256, 12, 12)), ("ReLU", (256, 12, 12)), ("MaxPool2d", (256, 5, 5)), ("Flatten", (6400,)),
    ("Linear", (4096,)), ("ReLU", (4096,)), ("Dropout", (4096,)), ("Linear", (4096,)), ("ReLU", (4096,)), ("Dropout", (4096,)),
    ("Linear", (10,)),
]
ALEXNET_224 = [
    ("Conv2d", (96, 54, 54)), ("ReLU", (96, 54, 54)), ("MaxPool2d", (96, 26, 26)),
    ("Conv2d", (256, 26, 26)), ("ReLU", (256, 26, 26)), ("MaxPool2d", (256, 12, 12)), *_ALEXNET_TAIL,
]
ALEXNET_28 = [  # note 004's variant
    ("Conv2d", (96, 28, 28)), ("ReLU", (96, 28, 28)), ("MaxPool2d", (96, 26, 26)),
    ("Conv2d", (256, 26, 26)), ("ReLU", (256, 26, 26)), ("MaxPool2d", (256, 12, 12)), *_ALEXNET_TAIL,
]
VGG_224 = [  # the notes print VGG per block; ratio divides the block widths
    ("Sequential", (64, 112, 112)), ("Sequential", (128, 56, 56)), ("Sequential", (256, 28, 28)),
    ("Sequential", (512, 14, 14)), ("Sequential", (512, 7, 7)), ("Flatten", (25088,)),
    ("Linear", (4096,)), ("ReLU", (4096,)), ("Dropout", (4096,)), ("Linear", (4096,)), ("ReLU", (4096,)), ("Dropout", (4096,)),
    ("Linear", (10,)),
]


def _vgg_at_ratio(ratio):
    rows = []
    for name, shape in VGG_224:
        if name == "Sequential":
            shape = (shape[0] // ratio, *shape[1:])
        elif name == "Flatten":
            shape = (shape[0] // ratio,)
        rows.append((name, shape))
    return rows


def layer_shapes(net, resize):
    x, rows = torch.zeros(1, 1, resize, resize, device=next(net.parameters()).device), []
    for layer in net:
        x = layer(x)
        rows.append((type(layer).__name__, tuple(x.shape[1:])))
    return rows


@pytest.mark.parametrize("arch, resize, ratio, expected", [
    ("lenet", 28, 1, LENET_28),
    ("alexnet", 224, 1, ALEXNET_224),
    ("alexnet_28", 28, 1, ALEXNET_28),
    ("vgg11", 224, 1, VGG_224),
    ("vgg11", 224, 4, _vgg_at_ratio(4)),
])
def test_layer_shapes_match_the_notes(arch, resize, ratio, expected):
    with torch.device("meta"):  # shapes only; no memory for VGG-11's 129 M parameters
        net = build_model(arch, resize, ratio)
    assert layer_shapes(net, resize) == expected


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_minimum_resize_is_exact(arch):
    minimum = ARCHITECTURES[arch].min_resize
    with torch.device("meta"):
        assert build_model(arch, minimum)(torch.zeros(2, 1, minimum, minimum)).shape == (2, 10)
    with pytest.raises(InputTooSmallError, match=f"{arch} needs resize >= {minimum}"):
        build_model(arch, minimum - 1)


def test_parameter_counts_are_pinned():
    # 1-channel input, 10 classes; the notes' AlexNet is ~46.8 M, the d2l VGG-11 exercise (ratio 4) ~43.1 M.
    with torch.device("meta"):
        counts = {
            "lenet": parameter_count(build_model("lenet")),
            "alexnet": parameter_count(build_model("alexnet")),
            "alexnet_28": parameter_count(build_model("alexnet_28")),
            "vgg11": parameter_count(build_model("vgg11", 224, 1)),
            "vgg11_ratio4": parameter_count(build_model("vgg11", 224, 4)),
        }
    assert counts == {"lenet": 61706, "alexnet": 46764746, "alexnet_28": 46755530, "vgg11": 128806154, "vgg11_ratio4": 43093322}


def test_weights_are_xavier_uniform():
    net = build_model("lenet")
    conv = net[0]
    fan_in, fan_out = 1 * 25, 6 * 25
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound


def test_unknown_architecture_and_bad_ratio():
    with pytest.raises(ValueError, match="unknown architecture 'resnet99'; choose one of"):
        build_model("resnet99")
    with pytest.raises(ValueError, match="ratio 8 leaves a layer of 6 channels with none"):
        build_model("lenet", ratio=8)
