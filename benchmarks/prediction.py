"""How close is a launch's start prediction to the time its trials take?

    python -m benchmarks.prediction                              # every shipped study, 2 trials each, on its cpu preset
    python -m benchmarks.prediction lenet_lr_epochs --trials 1   # one study
    python -m benchmarks.prediction --record                     # and append the table to benchmarks/RESULTS.md

Claim: on its `cpu` preset, every shipped study's start prediction is within ±30 % of its real time (a ratio
real / predicted between 0.7 and 1.3). Each study runs as a user runs it, `python -m study launch NAME --trials N
--preset cpu --log-model none`, in a scratch STUDY_HOME of its own, so its start prediction comes from the training
steps it times on this machine ("timing this machine"), not from trials measured before. From the storage: the
prediction the launch kept (the study's `forecast`, study.budget.Forecast.kept) and the real time of its trials,
from the first one's start to the last one's end as Optuna recorded them. Evidence and dates: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

import records
from study.specs import available

RESULTS = Path(__file__).with_name("RESULTS.md")
WITHIN = 0.3  # the claim: real / predicted within 1 ± this


def measure(name: str, trials: int, home: Path) -> tuple[float, float] | str:
    """(predicted seconds, real seconds) of `trials` trials of study `name` launched in `home`; a string: why not."""
    command = [sys.executable, "-m", "study", "launch", name, "--trials", str(trials), "--preset", "cpu", "--log-model", "none"]
    done = subprocess.run(command, env={**os.environ, "STUDY_HOME": str(home)}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"launch exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(home / "optuna.journal")))
    study = optuna.load_study(study_name=Path(name).stem, storage=storage)  # NAME, or a spec file's stem
    ran = [t for t in study.trials if t.datetime_start is not None and t.datetime_complete is not None]
    real = (max(t.datetime_complete for t in ran) - min(t.datetime_start for t in ran)).total_seconds()
    return study.user_attrs[records.FORECAST]["seconds"], real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prediction", description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="*", help="shipped studies (default: all of them)")
    parser.add_argument("--trials", type=int, default=2, help="trials of each study (default: 2)")
    parser.add_argument("--record", action="store_true", help="append the table, with device, date and command, to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    names = args.studies or available()
    unknown = sorted(set(names) - set(available()))
    if unknown or args.trials < 1:
        print(f"error: unknown study {', '.join(unknown)}; shipped: {', '.join(available())}" if unknown else
              f"error: --trials must be >= 1; got {args.trials}", file=sys.stderr)
        return 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    command = " ".join(["python -m benchmarks.prediction", *(sys.argv[1:] if argv is None else argv)])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    heading = (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"load average {load}; `{command}`")
    lines = [heading]
    lines += ["", "| study | trials | predicted at the start | real | real / predicted | within ±30 % |", "|---|---:|---:|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"prediction-{name}-") as home:
            result = measure(name, args.trials, Path(home))
        if isinstance(result, str):
            line = f"| {name} | {args.trials} | - | - | - | {result} |"
        else:
            predicted, real = result
            ratio = real / predicted
            line = f"| {name} | {args.trials} | {predicted:.0f} s | {real:.0f} s | {ratio:.2f} | {'yes' if abs(ratio - 1) <= WITHIN else 'no'} |"
        print(line, flush=True)
        lines.append(line)
    if args.record:
        with RESULTS.open("a") as results:
            results.write("\n## The start prediction against the real time, cpu presets (`benchmarks/prediction.py`)\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
