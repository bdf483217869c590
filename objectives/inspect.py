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
    net = build_model(arch, resize, ratio).eval()
    x = torch.zeros(1, 1, resize, resize)
    rows = []
    for index, layer in enumerate(net):
        with FlopCounterMode(display=False) as counter:
            x = layer(x)
        rows.append(LayerCost(index, type(layer).__name__, tuple(x.shape[1:]), parameter_count(layer), counter.get_total_flops(), x.numel() * FP32_BYTES))
    return rows
