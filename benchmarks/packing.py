"""What running several trials on one device at once buys: trials per hour for 1, 2, 4 at a time.

    python -m benchmarks.packing --device cuda                  # vgg_ratio's full preset, 8 trials of 2 epochs
    python -m benchmarks.packing --device cpu --quick           # a check that it runs

The trials are drawn at random (seeded, the same list for every packing) from the vgg_ratio
study's search space for the chosen preset, with epochs capped so the benchmark stays short.
Each trial runs `objectives.train` in its own process (spawned, as study workers are); with
packing K, K processes share the device. Small networks leave a large GPU idle between kernels,
so packing them can raise trials per hour; large ones only queue behind each other.
Imports only torch and `objectives`/`study.specs` (which needs no Optuna or MLflow).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from objectives import TrainConfig, load_fashion_mnist, train
from study.specs import load_spec, resolve


class RandomTrial:
    """Draws as Optuna's random sampler does, with the calls a plan's search space makes (no Optuna needed)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list):
        return self.rng.choice(choices)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        if log:
            return round(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        return self.rng.randrange(low, high + 1, step)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        return math.exp(self.rng.uniform(math.log(low), math.log(high))) if log else self.rng.uniform(low, high)


def draw_configs(preset: str, trials: int, max_epochs: int, seed: int, device: str, quick: bool, eager: bool = False) -> list[TrainConfig]:
    """`trials` configs drawn uniformly (log-uniformly for log ranges) from vgg_ratio's search space."""
    plan = resolve(load_spec("vgg_ratio"), preset)
    rng = RandomTrial(random.Random(seed))
    configs = []
    for _ in range(trials):
        config = plan.trial_config(rng)
        overrides = {"device": device, "epochs": min(config.epochs, max_epochs)}
        if eager:
            overrides["cuda_graph"] = False
        if quick:
            overrides |= {"n_train": 512, "n_val": 128, "n_test": 128, "epochs": 1}
        configs.append(dataclasses.replace(config, **overrides))
    return configs


def _run_one(config: TrainConfig) -> tuple[float, float]:
    result = train(config, load_fashion_mnist())
    return result.wall_seconds, result.val_accuracy


def trials_per_hour(configs: list[TrainConfig], packing: int) -> tuple[float, float]:
    """(trials per hour, mean seconds per trial) running `packing` trials at a time."""
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=packing, mp_context=multiprocessing.get_context("spawn")) as pool:
        seconds = [wall for wall, _ in pool.map(_run_one, configs)]
    elapsed = time.perf_counter() - start
    return len(configs) / elapsed * 3600, sum(seconds) / len(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=["cpu", "full"], help="default: full on CUDA, cpu without")
    parser.add_argument("--packing", type=int, action="append", help="trials at a time; repeat (default: 1, 2, 4)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny data subsets and one epoch: checks that it runs")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs: every step launched from Python, as before they replayed")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    packings = args.packing or [1, 2, 4]
    if args.trials < 1 or args.max_epochs < 1 or min(packings) < 1:
        print("error: --trials, --max-epochs and --packing must be >= 1", file=sys.stderr)
        return 1
    preset = args.preset or ("full" if args.device == "cuda" else "cpu")
    configs = draw_configs(preset, args.trials, args.max_epochs, seed=0, device=args.device, quick=args.quick, eager=args.eager)
    print(f"vgg_ratio preset {preset}, {args.trials} trials of at most {args.max_epochs} epochs on {args.device}{' (eager steps)' if args.eager else ''}, "
          f"torch {torch.__version__}")
    base = None
    for packing in packings:
        rate, seconds = trials_per_hour(configs, packing)
        base = base or rate
        print(f"{packing} at a time: {rate:.0f} trials/hour ({rate / base:.2f}x of {packings[0]} at a time), {seconds:.1f} s per trial", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
