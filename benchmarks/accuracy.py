"""Speed must not cost accuracy: train at the notes' settings with our fast path and compare.

    python -m benchmarks.accuracy --arch alexnet --device cuda               # notes: test acc 0.883 after 10 epochs
    python -m benchmarks.accuracy --arch lenet --precision fp32 --precision bf16   # the same run in both precisions

Each run uses the architecture's settings from the notes (learning rate, epochs, batch size,
resize; `objectives.models`), the whole 55,000-image training split, and reports validation
and test accuracy. Where the notes print a test accuracy (AlexNet at 224 px: 0.883), a run
passes when it lands within 1.5 points of it. Imports only torch and `objectives`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from objectives import TrainConfig, get_architecture, load_fashion_mnist, train

NOTES_TEST_ACCURACY = {"alexnet": 0.883}  # note 000, after 10 epochs at lr 0.01, batch 128, 224 px
TOLERANCE = 0.015


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", action="append", choices=["auto", "bf16", "fp32"], help="repeat to compare (default: auto)")
    parser.add_argument("--epochs", type=int, help="default: the notes' epochs for the architecture")
    args = parser.parse_args(argv)
    arch = get_architecture(args.arch)
    data = load_fashion_mnist()
    failed = False
    for precision in args.precision or ["auto"]:
        config = TrainConfig(arch=args.arch, lr=arch.lr, epochs=args.epochs or arch.epochs, batch_size=arch.batch_size, resize=arch.default_resize,
                             device=args.device, precision=precision)
        result = train(config, data, on_epoch=lambda m: print(f"  epoch {m.epoch}: loss {m.train_loss:.4f}, val_accuracy {m.val_accuracy:.4f}, "
                                                               f"{m.examples_per_second:.0f} examples/s", flush=True))
        line = (f"{args.arch} at {config.resize} px, lr {config.lr}, {config.epochs} epochs, batch {config.batch_size}, precision {precision} "
                f"on {result.device_name}: val_accuracy {result.val_accuracy:.4f}, test_accuracy {result.test_accuracy:.4f}, "
                f"{result.train_seconds:.1f} s of training")
        expected = NOTES_TEST_ACCURACY.get(args.arch) if config.epochs == arch.epochs else None
        if expected is not None:
            ok = abs(result.test_accuracy - expected) <= TOLERANCE
            failed |= not ok
            line += f"; notes {expected:.3f}: {'within' if ok else 'NOT within'} {TOLERANCE * 100:.1f} points"
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
