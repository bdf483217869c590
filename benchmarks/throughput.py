"""Our trainer against the textbook pipeline, on the same machine, in the same run.

    python -m benchmarks.throughput --device cpu            # about 6 minutes on 2 CPU cores
    python -m benchmarks.throughput --device cuda           # the GPU figures (see benchmarks/gpu.sh)
    python -m benchmarks.throughput --device cpu --quick    # a check that everything runs, seconds

Claim: end-to-end training examples per second (model build, every epoch's training and
evaluation; the dataset files are read once before the clock starts) of `objectives.train`
against `benchmarks.reference.train_ch6`, for the networks and resizes the notes train, with the
notes' learning rate and batch size and the same number of examples on both sides. Evidence and
dates: benchmarks/RESULTS.md. Then a second table: the training TFLOP/s and steps per second of each
shape that the shipped studies' `cpu` presets train (PRESET_SHAPES; on CUDA, the small end of the full
search spaces, CUDA_SMALL_SHAPES), beside AlexNet-224's measured the same way in the same run, and
their ratio; on a CPU also the share of each step spent inside convolutions and matrix products (the only
operators whose FLOPs are counted) and the ratio that sets as a ceiling. The last line printed is the
geometric-mean speed-up.

Imports only torch, Pillow and `objectives`, so it runs on a machine that has nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.reference import train_ch6
from objectives import TrainConfig, get_architecture, load_fashion_mnist, train
from objectives.train import bf16_autocast


@dataclass(frozen=True)
class Case:
    arch: str
    resize: int
    ratio: int
    # (training examples, epochs, evaluation examples) per device; both sides train and evaluate exactly these.
    cpu: tuple[int, int, int]
    cuda: tuple[int, int, int]


CASES = (
    Case("lenet", 28, 1, cpu=(10240, 2, 2048), cuda=(55000, 3, 5000)),
    Case("alexnet", 224, 1, cpu=(512, 1, 128), cuda=(55000, 1, 5000)),
    Case("alexnet_28", 28, 1, cpu=(512, 1, 128), cuda=(55000, 1, 5000)),
    Case("vgg11", 224, 4, cpu=(512, 1, 128), cuda=(55000, 1, 5000)),
    Case("resnet18", 96, 1, cpu=(1024, 1, 128), cuda=(55000, 1, 5000)),
)
# The shapes the shipped studies' `cpu` presets train (study/specs/*.toml, [presets.cpu]): arch, resize,
# ratio, batch size. A test checks that every preset shape is listed here.
PRESET_SHAPES = (
    ("alexnet", 65, 4, 64),
    ("alexnet", 65, 4, 128),
    ("alexnet_28", 28, 8, 64),
    ("alexnet_28", 28, 8, 128),
    ("densenet", 32, 4, 64),
    ("densenet", 32, 4, 128),
    ("googlenet", 32, 4, 64),
    ("googlenet", 32, 4, 128),
    ("lenet", 28, 1, 64),
    ("lenet", 28, 1, 256),
    ("lenet_bn", 28, 1, 64),
    ("lenet_bn", 28, 1, 256),
    ("nin", 67, 4, 64),
    ("nin", 67, 4, 128),
    ("resnet18", 32, 4, 64),
    ("resnet18", 32, 4, 128),
    ("vgg11", 32, 4, 128),
    ("vgg11", 32, 8, 64),
    ("vgg11", 32, 8, 128),
)
PRESET_SHAPE_STEPS = 8  # training steps per shape, timed after as many have warmed oneDNN up
# On CUDA, the small end of the full search spaces (vgg_ratio's ratio 16 at 32 px is a few MFLOPs an example):
# whether such a step is bound by kernel launches rather than arithmetic, beside AlexNet-224.
CUDA_SMALL_SHAPES = (
    ("lenet", 28, 1, 256),
    ("alexnet_28", 28, 4, 128),
    ("vgg11", 32, 16, 128),
    ("vgg11", 32, 4, 128),
    ("vgg11", 96, 4, 128),
    ("vgg11", 224, 4, 128),
    ("resnet18", 32, 4, 256),
    ("googlenet", 32, 4, 128),
)
CUDA_SHAPE_STEPS = 60
QUICK_DIVISOR = 8  # --quick: an eighth of the examples, at least one batch

# Dense bf16 peak of the GPUs we are lent, in FLOP/s, from the vendors' data sheets (without sparsity).
BF16_PEAK = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def cpu_name() -> str:
    """The CPU's model name where Linux tells it (platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def bf16_peak(device_name: str) -> float | None:
    """The GPU's dense bf16 peak; the most specific name that matches wins."""
    for name in sorted(BF16_PEAK, key=len, reverse=True):
        if name in device_name:
            return BF16_PEAK[name]
    return None


@dataclass
class Row:
    arch: str
    resize: int
    ratio: int
    examples: int                 # training examples on each side (train size x epochs)
    reference_per_second: float
    ours_per_second: float
    speedup: float
    reference_test_accuracy: float
    ours_test_accuracy: float
    train_flops_per_second: float  # ours, over the training part of its epochs
    mfu: float | None              # train_flops_per_second over the GPU's dense bf16 peak (CUDA only)


def measure(case: Case, data, device: str, quick: bool, precision: str, channels_last: bool | None, compile_model: bool) -> Row:
    n_train, epochs, n_eval = case.cuda if device == "cuda" else case.cpu
    arch = get_architecture(case.arch)
    if quick:
        n_train, epochs, n_eval = max(n_train // QUICK_DIVISOR, arch.batch_size), 1, max(n_eval // QUICK_DIVISOR, 64)
    examples = n_train * epochs
    common = {"lr": arch.lr, "epochs": epochs, "batch_size": arch.batch_size}

    reference = train_ch6(case.arch, case.resize, case.ratio, train_images=data.train_images[:n_train], train_labels=data.train_labels[:n_train],
                          test_images=data.test_images[:n_eval], test_labels=data.test_labels[:n_eval], device=device, **common)
    config = TrainConfig(arch=case.arch, resize=case.resize, ratio=case.ratio, n_train=n_train, n_val=n_eval, n_test=n_eval, device=device,
                         precision=precision, channels_last=channels_last, compile=compile_model, **common)
    # On a bf16 CPU "auto" times the shape once per process, before a study's first trial of it: made here, before
    # the clock starts, it does not weigh on a 4-step run as it never weighs on a trial's hundreds of steps.
    bf16_autocast(config)
    ours = train(config, data)
    flops_per_second = ours.train_flops / ours.train_seconds
    peak = bf16_peak(ours.device_name) if device == "cuda" else None
    return Row(
        arch=case.arch, resize=case.resize, ratio=case.ratio, examples=examples,
        reference_per_second=examples / reference.wall_seconds,
        ours_per_second=examples / ours.wall_seconds,
        speedup=reference.wall_seconds / ours.wall_seconds,
        reference_test_accuracy=reference.test_accuracy, ours_test_accuracy=ours.test_accuracy,
        train_flops_per_second=flops_per_second, mfu=flops_per_second / peak if peak else None,
    )


def _shape_config(arch: str, resize: int, ratio: int, batch_size: int, device: str, precision: str, channels_last: bool | None,
                  steps: int, **settings) -> TrainConfig:
    """Two epochs of `steps` batches of one shape, as measure_preset_shape and counted_operator_time both train it."""
    shape = {"arch": arch, "resize": resize, "ratio": ratio, "batch_size": batch_size, "lr": 0.01, "momentum": 0.9, "epochs": 2,
             "n_train": batch_size * steps, "n_val": batch_size, "n_test": batch_size, "device": device,
             "precision": precision, "channels_last": channels_last}
    return TrainConfig(**(shape | settings))


def measure_preset_shape(arch: str, resize: int, ratio: int, batch_size: int, data, device: str, precision: str,
                         channels_last: bool | None, steps: int, cuda_graph: bool | None = None) -> tuple[float, float]:
    """Training FLOP/s and steps per second of one shape, as a trial trains it: two epochs of `steps`
    batches, timed over the second, so the first step's one-off set-up (oneDNN, cuDNN, a CUDA graph's
    recording) is left out as it is from a trial's hundreds of steps."""
    config = _shape_config(arch, resize, ratio, batch_size, device, precision, channels_last, steps, cuda_graph=cuda_graph)
    result = train(config, data)
    seconds = result.history[-1].epoch_seconds
    return result.train_flops / result.epochs_run / seconds, steps / seconds


# The operators whose FLOPs torch's counter counts (convolutions and matrix products), as the CPU profiler names them.
COUNTED_OPERATORS = ("conv", "aten::mm", "aten::addmm", "aten::bmm")


def counted_operator_time(arch: str, resize: int, ratio: int, batch_size: int, data, precision: str, channels_last: bool | None,
                          steps: int) -> tuple[float, float]:
    """On a CPU: (the share of a training epoch's time spent inside convolutions and matrix products, the FLOP/s they
    reach there). The FLOP/s column counts only their FLOPs, so the second figure over AlexNet-224's is the most a
    shape can reach with today's kernels if everything else (activations, pooling, batch norm, concatenation, the
    optimiser, Python) took no time at all.

    The second of two epochs of `steps` batches, as measure_preset_shape times it, run once more under the profiler
    (whose own cost then stays out of the timed run); one validation image, so evaluation adds nothing.
    """
    config = _shape_config(arch, resize, ratio, batch_size, "cpu", precision, channels_last, steps, n_val=1, n_test=1)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_epoch(metrics) -> None:
        if metrics.epoch == 1:
            profiler.start()  # after epoch 1's validation, so what it records is epoch 2's training and validation
        else:
            profiler.stop()

    result = train(config, data, on_epoch)
    counted_us = sum(event.self_cpu_time_total for event in profiler.key_averages() if any(name in event.key for name in COUNTED_OPERATORS))
    epoch_seconds = result.history[-1].epoch_seconds
    return counted_us / 1e6 / epoch_seconds, result.train_flops / result.epochs_run / (counted_us / 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="an eighth of the examples and one epoch: checks that it runs, measures little")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable; default: all five cases)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="our trainer's precision (default: auto)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="our trainer's memory format (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (its compile time counts)")
    parser.add_argument("--no-preset-shapes", action="store_true", help="skip the table of the small shapes (the cpu presets' on a CPU)")
    parser.add_argument("--json", help="also write the rows and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    cases = [c for c in CASES if not args.arch or c.arch in args.arch]
    if not cases:
        print(f"error: --arch {args.arch} matches none of {', '.join(c.arch for c in CASES)}", file=sys.stderr)
        return 1
    channels_last = {"auto": None, "on": True, "off": False}[args.channels_last]

    data = load_fashion_mnist()
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_name()
    print(f"device {args.device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}{', quick' if args.quick else ''}")
    print(f"{'network':<22}{'examples':>9}{'reference ex/s':>16}{'ours ex/s':>11}{'speed-up':>10}{'ref test acc':>14}{'our test acc':>14}{'TFLOP/s':>9}{'MFU':>7}")
    rows = []
    for case in cases:
        started = time.perf_counter()
        row = measure(case, data, args.device, args.quick, args.precision, channels_last, args.compile)
        rows.append(row)
        name = f"{case.arch} {case.resize}px" + (f" r{case.ratio}" if case.ratio != 1 else "")
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "-"
        print(f"{name:<22}{row.examples:>9}{row.reference_per_second:>16.1f}{row.ours_per_second:>11.1f}{row.speedup:>9.2f}x"
              f"{row.reference_test_accuracy:>14.3f}{row.ours_test_accuracy:>14.3f}{row.train_flops_per_second / 1e12:>9.2f}{mfu:>7}"
              f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    preset_rows = []
    if not args.no_preset_shapes:
        shapes, steps = (PRESET_SHAPES, PRESET_SHAPE_STEPS) if args.device == "cpu" else (CUDA_SMALL_SHAPES, CUDA_SHAPE_STEPS)
        steps = 2 if args.quick else steps
        title = "cpu presets' shapes" if args.device == "cpu" else "small shapes of the full search spaces"
        # The yardstick is measured as the shapes are (second epoch of `steps` batches), so the ratios compare like with like.
        print(f"{title}, timed over {steps} training steps after as many (AlexNet-224 on a CPU: half), training TFLOP/s beside AlexNet-224's (batch 128)")
        if args.device == "cpu":
            print("in conv/mm: the share of the step inside convolutions and matrix products, whose FLOPs alone are counted; ceiling: their "
                  "TFLOP/s there over AlexNet-224's, what the shape would reach if every other operator took no time")
        # On CUDA each shape also trains without CUDA graphs: what replaying the step buys where launches bind it.
        # On a CPU each shape also runs once under the profiler: how much of its step the counted FLOPs account for.
        extra_columns = f"{'eager steps/s':>15}{'graphs buy':>12}" if args.device == "cuda" else f"{'in conv/mm':>12}{'ceiling':>9}"
        print(f"{'shape':<30}{'TFLOP/s':>9}{'of AlexNet-224':>16}{'steps/s':>9}{extra_columns}")
        yardstick = None
        for arch, resize, ratio, batch_size in (("alexnet", 224, 1, 128), *shapes):
            # AlexNet-224's steps take seconds each on a CPU: half as many still time several seconds.
            shape_steps = max(2, steps // 2) if (arch, resize) == ("alexnet", 224) and args.device == "cpu" else steps
            flops_per_second, steps_per_second = measure_preset_shape(arch, resize, ratio, batch_size, data, args.device, args.precision,
                                                                      channels_last, shape_steps)
            yardstick = yardstick or flops_per_second
            share = flops_per_second / yardstick
            row = {"arch": arch, "resize": resize, "ratio": ratio, "batch_size": batch_size,
                   "train_flops_per_second": flops_per_second, "of_alexnet_224": share, "steps_per_second": steps_per_second}
            name = f"{arch} {resize}px r{ratio} batch {batch_size}"
            line = f"{name:<30}{flops_per_second / 1e12:>9.3f}{share:>16.0%}{steps_per_second:>9.1f}"
            if args.device == "cuda":
                _, row["eager_steps_per_second"] = measure_preset_shape(arch, resize, ratio, batch_size, data, args.device, args.precision,
                                                                        channels_last, shape_steps, cuda_graph=False)
                line += f"{row['eager_steps_per_second']:>15.1f}{steps_per_second / row['eager_steps_per_second']:>11.2f}x"
            else:
                row["counted_time_share"], row["counted_flops_per_second"] = counted_operator_time(
                    arch, resize, ratio, batch_size, data, args.precision, channels_last, shape_steps)
                row["ceiling_of_alexnet_224"] = row["counted_flops_per_second"] / yardstick
                line += f"{row['counted_time_share']:>12.0%}{row['ceiling_of_alexnet_224']:>9.0%}"
            preset_rows.append(row)
            print(line, flush=True)
    geomean = math.exp(sum(math.log(r.speedup) for r in rows) / len(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as out:
            json.dump({"device": device_name, "torch": torch.__version__, "settings": settings, "rows": [asdict(r) for r in rows], "preset_shapes": preset_rows,
                       "geomean_speedup": geomean, "date": time.strftime("%Y-%m-%d")}, out, indent=2)
    print(f"geometric-mean speed-up over {len(rows)} networks: {geomean:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
