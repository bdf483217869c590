"""Layer output shapes against those printed in the notes (../shared/seeds), minimum inputs, parameter counts."""

import dataclasses

import pytest
import torch
from torch import nn

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


NIN_224 = [
    ("Sequential", (96, 54, 54)), ("MaxPool2d", (96, 26, 26)), ("Sequential", (256, 26, 26)), ("MaxPool2d", (256, 12, 12)),
    ("Sequential", (384, 12, 12)), ("MaxPool2d", (384, 5, 5)), ("Dropout", (384, 5, 5)), ("Sequential", (10, 5, 5)),
    ("AdaptiveAvgPool2d", (10, 1, 1)), ("Flatten", (10,)),
]
# d2l 7.4 and 7.6 print GoogLeNet and ResNet-18 per block at 96 px.
GOOGLENET_96 = [
    ("Sequential", (64, 24, 24)), ("Sequential", (192, 12, 12)), ("Sequential", (480, 6, 6)), ("Sequential", (832, 3, 3)),
    ("Sequential", (1024, 1, 1)), ("Flatten", (1024,)), ("Linear", (10,)),
]
RESNET18_96 = [
    ("Sequential", (64, 24, 24)), ("Sequential", (64, 24, 24)), ("Sequential", (128, 12, 12)), ("Sequential", (256, 6, 6)),
    ("Sequential", (512, 3, 3)), ("AdaptiveAvgPool2d", (512, 1, 1)), ("Flatten", (512,)), ("Linear", (10,)),
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
    ("nin", 224, 1, NIN_224),
    ("googlenet", 96, 1, GOOGLENET_96),
    ("resnet18", 96, 1, RESNET18_96),
])
def test_layer_shapes_match_the_notes(arch, resize, ratio, expected):
    with torch.device("meta"):  # shapes only; no memory for VGG-11's 129 M parameters
        net = build_model(arch, resize, ratio)
    assert layer_shapes(net, resize) == expected


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_minimum_and_default_resize_train_one_step(arch):
    spec = ARCHITECTURES[arch]
    for resize in sorted({spec.min_resize, spec.default_resize}):
        torch.manual_seed(0)
        net = build_model(arch, resize)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        x, y = torch.rand(4, 1, resize, resize), torch.tensor([0, 1, 2, 3])
        logits = net(x)
        assert logits.shape == (4, 10)
        before = [p.detach().clone() for p in net.parameters()]
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    with pytest.raises(InputTooSmallError, match=f"{arch} needs resize >= {spec.min_resize}"):
        build_model(arch, spec.min_resize - 1)


# Where pooling without padding makes the feature maps vanish, the declared minimum is exact.
@pytest.mark.parametrize("arch", ["lenet", "lenet_bn", "alexnet", "alexnet_28", "vgg11", "nin", "densenet"])
def test_minimum_resize_is_where_feature_maps_vanish(arch):
    from objectives.models import _make_layers

    spec = ARCHITECTURES[arch]
    with torch.device("meta"):
        layers, _ = _make_layers(spec.features, 1, 1, spec)
        features = torch.nn.Sequential(*layers).eval()
        features(torch.zeros(1, 1, spec.min_resize, spec.min_resize))
        with pytest.raises(RuntimeError):
            features(torch.zeros(1, 1, spec.min_resize - 1, spec.min_resize - 1))


def test_parameter_counts_are_pinned():
    # 1-channel input, 10 classes; the notes' AlexNet is ~46.8 M, the d2l VGG-11 exercise (ratio 4) ~43.1 M.
    with torch.device("meta"):
        counts = {
            "lenet": parameter_count(build_model("lenet")),
            "alexnet": parameter_count(build_model("alexnet")),
            "alexnet_28": parameter_count(build_model("alexnet_28")),
            "vgg11": parameter_count(build_model("vgg11", 224, 1)),
            "vgg11_ratio4": parameter_count(build_model("vgg11", 224, 4)),
            **{arch: parameter_count(build_model(arch)) for arch in ("lenet_bn", "nin", "googlenet", "resnet18", "densenet")},
        }
    assert counts == {
        "lenet": 61706, "alexnet": 46764746, "alexnet_28": 46755530, "vgg11": 128806154, "vgg11_ratio4": 43093322,
        "lenet_bn": 44878, "nin": 1992166, "googlenet": 5977530, "resnet18": 11178378, "densenet": 758226,
    }


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


def test_ratio_divides_every_width_but_the_class_scores():
    with torch.device("meta"):
        for arch in ("nin", "googlenet", "resnet18", "densenet"):
            full, quarter = parameter_count(build_model(arch)), parameter_count(build_model(arch, ratio=4))
            assert quarter < full / 8, arch  # conv parameters scale with width squared
            assert build_model(arch, ratio=4)(torch.zeros(1, 1, 96, 96)).shape == (1, 10)


def test_he_init_keeps_the_signal_through_relu_layers_where_xavier_shrinks_it():
    # Without batch norm, Xavier halves the variance at every ReLU; He init's gain of sqrt(2) keeps it.
    torch.manual_seed(0)
    x = torch.rand(64, 1, 32, 32)
    scale = {init: build_model("vgg11", 32, 4, init).eval()[:-1](x).std().item() for init in ("xavier", "kaiming")}
    assert scale["kaiming"] > 4 * scale["xavier"]
    he = build_model("vgg11", 32, 4, "kaiming")
    assert all(not m.bias.any() for m in he.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    with pytest.raises(ValueError, match="init must be xavier or kaiming; got 'he'"):
        build_model("lenet", init="he")


def _d2l_init(net, init, nonlinearity):
    # d2l's init_weights (Xavier-uniform weights), or He-uniform weights and zero biases, layer by layer in module order.
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_uniform_(module.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(module.bias)
    return net


def _d2l_lenet():  # d2l 6.6
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10))


def _d2l_vgg11_32px(ratio):  # d2l 7.2 with its exercise's channel ratio, at 32 px (five halvings leave 1x1)
    blocks, in_channels = [], 1
    for num_convs, out_channels in ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)):
        layers = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, out_channels // ratio, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = out_channels // ratio
        blocks.append(nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2)))
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(in_channels, 4096), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 10))


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_the_builder_makes_the_notes_networks_weight_for_weight(init):
    """The layer tables build, for one seed, the networks the notes write out by hand: same layers, same initial weights."""
    for arch, resize, ratio, by_hand, nonlinearity in (("lenet", 28, 1, _d2l_lenet, "sigmoid"),
                                                       ("vgg11", 32, 8, lambda: _d2l_vgg11_32px(8), "relu")):
        torch.manual_seed(0)
        built = build_model(arch, resize, ratio, init)
        torch.manual_seed(0)
        expected = _d2l_init(by_hand(), init, nonlinearity)
        assert str(built) == str(expected), arch
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values(), strict=True)), arch


def test_he_init_takes_the_gain_of_the_activation(monkeypatch):
    lenet = ARCHITECTURES["lenet"]
    monkeypatch.setitem(ARCHITECTURES, "lenet_tanh", dataclasses.replace(lenet, name="lenet_tanh", activation=nn.Tanh))
    conv = build_model("lenet_tanh", init="kaiming")[0]
    bound = nn.init.calculate_gain("tanh") * (3 / 25) ** 0.5  # He-uniform: gain * sqrt(3 / fan_in), fan_in 1 x 5 x 5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    # An activation torch has no gain for is refused, never initialised with another's gain.
    monkeypatch.setitem(ARCHITECTURES, "lenet_relu6", dataclasses.replace(lenet, name="lenet_relu6", activation=nn.ReLU6))
    with pytest.raises(ValueError, match="init kaiming needs the gain of ReLU6"):
        build_model("lenet_relu6", init="kaiming")
    assert isinstance(build_model("lenet_relu6", init="xavier")[1], nn.ReLU6)  # Xavier needs no gain


def test_conv_rows_take_groups(monkeypatch):
    # A depthwise 3x3 conv (groups = channels) after a full one: one 3x3 filter per channel.
    features = (("conv", 8, 3, 1, 1), ("conv", 8, 3, 1, 1, 8), ("avg", 2, 2))
    monkeypatch.setitem(ARCHITECTURES, "depthwise", dataclasses.replace(ARCHITECTURES["lenet"], name="depthwise", features=features))
    net = build_model("depthwise", 28)
    assert (net[2].groups, net[2].weight.shape) == (8, (8, 1, 3, 3))
    assert parameter_count(net[2]) == 8 * 9 + 8
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
