"""Where a network's cost goes: one row per top-level layer or block, as the notes print them.

Each row holds the output shape, the parameters, the forward FLOPs (torch's own counter, the
same one the trainer uses for `flops_per_example`) and the activation memory of its output at
batch 1 in fp32.

Example:
    >>> rows = layer_costs("alexnet", 224)
    >>> max(rows, key=lambda row: row.flops).layer
    'Conv2d'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from objectives.models import build_model, get_architecture, parameter_count

FP32_BYTES = 4


@dataclass(frozen=True)
class LayerCost:
    index: int
    layer: str                    # the module's class, e.g. Conv2d, Sequential (a block)
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int
    flops: int                    # forward, one example
    activation_bytes: int         # the output at batch 1, fp32


@torch.no_grad()
def layer_costs(arch: str, resize: int | None = None, ratio: int = 1) -> list[LayerCost]:
    resize = resize or get_architecture(arch).default_resize
    # On the meta device: shapes and FLOPs without computing or allocating anything, whatever the size.
    with torch.device("meta"):
        net = build_model(arch, resize, ratio).eval()
        x = torch.zeros(1, 1, resize, resize)
        rows = []
        for index, layer in enumerate(net):
            with FlopCounterMode(display=False) as counter:
                x = layer(x)
            rows.append(LayerCost(index, type(layer).__name__, tuple(x.shape[1:]), parameter_count(layer), counter.get_total_flops(), x.numel() * FP32_BYTES))
    return rows


def training_bytes(arch: str, resize: int, ratio: int, batch_size: int) -> int:
    """A lower bound on the memory one training step needs in fp32: the weights, their gradients and
    momentum, and every layer's output, which autograd keeps for the backward pass. On the meta device,
    so that even an impossible size costs nothing to estimate."""
    params, outputs = _parameters_and_outputs(arch, resize, ratio)
    return (3 * params + batch_size * outputs) * FP32_BYTES


@functools.lru_cache(maxsize=256)  # a launch checks each shape before it writes, then each trial before it trains
@torch.no_grad()
def _parameters_and_outputs(arch: str, resize: int, ratio: int) -> tuple[int, int]:
    """The network's parameters, and the elements of every layer's output for one example."""
    outputs = 0

    def count(module, inputs, output) -> None:
        nonlocal outputs
        outputs += output.numel()

    with torch.device("meta"):
        net = build_model(arch, resize, ratio).eval()
        for module in net.modules():
            if not list(module.children()):
                module.register_forward_hook(count)
        net(torch.zeros(1, 1, resize, resize))
    return parameter_count(net), outputs
