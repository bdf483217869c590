"""A trial's training state after an epoch, so that an interrupted trial resumes where it stopped.

A checkpoint holds everything the next epoch depends on: the network's weights, the optimiser's state (momentum
buffers), the data-order generator's state, torch's global random state (dropout draws from it), the precision
the run resolved, the epochs done with their metrics, and the config that made it. Resumed from it, a run
trains the remaining epochs exactly as the uninterrupted run would have (bit for bit on a CPU in fp32).

It is written whole or not at all (objectives.files.write_whole), so a kill during the write leaves the previous
epoch's checkpoint, and read with `weights_only`: a checkpoint is data, never code, also from a shared folder.
`read_checkpoint` refuses, with the reason, one that is torn, unreadable or made by another configuration.

Example:
    >>> result = train(config, data, checkpoint=Path("7.pt"), on_epoch=lambda m: m.epoch == 2)  # stops after epoch 2
    >>> resumed = train(config, data, checkpoint=Path("7.pt"), resume=read_checkpoint(Path("7.pt"), config))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from objectives.files import write_whole

FORMAT = 1  # bumped when the content changes; a checkpoint of another format is refused, never misread
# Settings that say where a run trains, not what it trains: a retry may take another GPU or node.
PLACEMENT = ("device",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, torn, unreadable or made by another configuration."""


@dataclass
class Checkpoint:
    config: dict            # dataclasses.asdict(TrainConfig) of the run that wrote it
    epoch: int              # epochs done
    history: list[dict]     # dataclasses.asdict(EpochMetrics) of each epoch done
    precision: str          # as the run resolved it: "bf16" or "fp32"; a resumed run keeps it
    model: dict             # the network's state_dict
    optimizer: dict         # the optimiser's state_dict
    generator: torch.Tensor  # the data-order generator's state
    cpu_rng: torch.Tensor   # torch's global CPU random state (dropout on the CPU)
    cuda_rng: torch.Tensor | None  # the device's random state on CUDA, else None


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` to `path`, whole or not at all."""
    content = {"format": FORMAT, **dataclasses.asdict(checkpoint)}
    return write_whole(Path(path), lambda out: torch.save(content, out))


def read_checkpoint(path: Path, config) -> Checkpoint:
    """The checkpoint at `path`, checked against the TrainConfig `config` that is to resume from it; CheckpointError
    with the reason when it is missing, torn or made by another configuration. Tensors load on the CPU."""
    try:
        # mmap: the tensors are read as they are used, so a caller that wants only the history reads little of the file.
        content = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as error:  # noqa: BLE001 -- a torn or foreign file fails in zip, unpickling (weights_only) or tensor code
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is torn or unreadable ({cause})") from None
    fields = {f.name for f in dataclasses.fields(Checkpoint)}
    if not isinstance(content, dict) or content.get("format") != FORMAT or not fields <= set(content):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of format {FORMAT}")
    wanted = {k: v for k, v in dataclasses.asdict(config).items() if k not in PLACEMENT}
    made = {k: v for k, v in content["config"].items() if k not in PLACEMENT}
    if made != wanted:
        differ = sorted(k for k in set(made) | set(wanted) if made.get(k) != wanted.get(k))
        raise CheckpointError(f"checkpoint {path} was made by another configuration ({', '.join(f'{k} {made.get(k)!r} != {wanted.get(k)!r}' for k in differ)})")
    if not 1 <= content["epoch"] < config.epochs or len(content["history"]) != content["epoch"]:
        raise CheckpointError(f"checkpoint {path} holds {content['epoch']} epochs, which a run of {config.epochs} epochs cannot resume from")
    return Checkpoint(**{name: content[name] for name in fields})
