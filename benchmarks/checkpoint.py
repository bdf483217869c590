"""What a trial's per-epoch checkpoint costs: its time and size for each shipped study's largest configuration.

    python -m benchmarks.checkpoint                   # every shipped study, preset full (about a minute on 2 cores)
    python -m benchmarks.checkpoint --preset cpu --dir /shared/checkpoints

Claim: a checkpoint after every epoch costs a small share of the epoch. For each shipped study and each of its
architectures, the configuration with the largest training step its preset can draw (study.validate.largest_configs:
largest input, smallest channel divisor) is built as the trainer builds it (channels_last, fp32, its optimiser with
momentum buffers when it has momentum), and its checkpoint is written as the trainer writes it
(objectives.checkpoint.write_checkpoint: temporary file, fsync, rename) `--repeats` times into `--dir`; the
median write time is set against the epoch's time at a stated throughput (the configuration's training FLOPs of one
epoch, study.budget.predicted_flops, at ASSUMED_FLOPS_PER_SECOND for a CPU and for a GPU's share). Evidence and dates:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from objectives.checkpoint import Checkpoint, write_checkpoint
from objectives.models import build_model
from study.budget import predicted_flops
from study.specs import available, load_spec, resolve
from study.validate import largest_configs

# Training FLOPs per second of device time this benchmark sets an epoch at: a conservative 2-core CPU, and a fraction
# of a data-centre GPU (small networks leave most of it idle).
ASSUMED_FLOPS_PER_SECOND = {"cpu": 2e10, "cuda": 2e13}


def checkpoint_of(config) -> Checkpoint:
    """The checkpoint the trainer writes after epoch 1 of `config`, with untrained weights (the size is the same)."""
    model = build_model(config.arch, config.resize, config.ratio, config.init).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.momentum > 0:  # what a first step leaves: one momentum buffer per parameter
        for parameter in model.parameters():
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return Checkpoint(config=dataclasses.asdict(config), epoch=1, history=[], precision="fp32", model=model.state_dict(),
                      optimizer=optimizer.state_dict(), generator=torch.Generator().get_state(), cpu_rng=torch.get_rng_state(), cuda_rng=None)


def measure(config, folder: Path, repeats: int) -> dict:
    checkpoint = checkpoint_of(config)
    path = folder / "trial.pt"
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        write_checkpoint(path, checkpoint)
        seconds.append(time.perf_counter() - start)
    epoch_flops = predicted_flops(config) / config.epochs
    write = statistics.median(seconds)
    return {"arch": config.arch, "resize": config.resize, "ratio": config.ratio, "bytes": path.stat().st_size, "write_seconds": write,
            "cpu_epoch_seconds": epoch_flops / ASSUMED_FLOPS_PER_SECOND["cpu"], "gpu_epoch_seconds": epoch_flops / ASSUMED_FLOPS_PER_SECOND["cuda"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", choices=["cpu", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, median of {args.repeats} writes")
    print("| study | arch | resize | ratio | size (MB) | write (s) | epoch on CPU (s, assumed) | share | epoch on a GPU (s, assumed) | share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name in available():
            for config in largest_configs(resolve(load_spec(name), args.preset)):
                row = measure(config, Path(folder), args.repeats)
                print(f"| {name} | {row['arch']} | {row['resize']} | {row['ratio']} | {row['bytes'] / 1e6:.1f} | {row['write_seconds']:.3f} | "
                      f"{row['cpu_epoch_seconds']:.0f} | {row['write_seconds'] / row['cpu_epoch_seconds']:.2%} | "
                      f"{row['gpu_epoch_seconds']:.1f} | {row['write_seconds'] / row['gpu_epoch_seconds']:.2%} |", flush=True)


if __name__ == "__main__":
    main()
