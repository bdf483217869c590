"""Does each shipped study learn within its CPU preset's budget, and how long does it take?

    python -m benchmarks.presets                          # every shipped study, 10 trials each (35-40 minutes on 2 AVX-512 cores, 80 on 2 AVX2 cores)
    python -m benchmarks.presets --study vgg_ratio --trials 50 --log-model best   # what `make demo` runs
    python -m benchmarks.presets --workers 2              # two trials at once, a core each (launch's --workers)

Each study runs as a user runs it, `python -m study launch NAME --trials N --preset cpu --log-model none`,
in a scratch STUDY_HOME of its own, so nothing is resumed and nothing of the user's is touched. One
row per study: trials (complete / pruned / failed), wall time of the launch, best validation accuracy
and that trial's test accuracy, the share of the launch spent inside `train()` (the trials'
wall_seconds over the launch's wall time, times the trials it runs at once; the rest is start-up, Optuna, MLflow and the report), and
for a study of several architectures each one's best validation accuracy among its complete trials.
Evidence and dates: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from study.specs import available

CHANCE = 0.1  # ten classes


@dataclass
class Row:
    study: str
    complete: int
    pruned: int
    failed: int
    wall_seconds: float
    best_val: float | None
    best_test: float | None
    train_share: float  # sum of trials' wall_seconds / (launch wall time x trials at once)
    best_by_arch: dict[str, float]  # studies of several architectures: each one's best validation accuracy


def run_study(name: str, trials: int, log_model: str, home: Path, workers: int = 1) -> Row:
    env = {**os.environ, "STUDY_HOME": str(home)}
    command = [sys.executable, "-m", "study", "launch", name, "--trials", str(trials), "--preset", "cpu", "--log-model", log_model]
    command += ["--workers", str(workers)] if workers > 1 else []  # one worker: launch's default, the trials in its own process
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(f"  {name}: launch exited {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}", file=sys.stderr)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(home / "optuna.journal")))
    study = optuna.load_study(study_name=Path(name).stem, storage=storage)  # NAME, or a spec file's stem
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    best = max(complete, key=lambda t: t.value, default=None)
    inside = sum(t.user_attrs.get("wall_seconds", 0.0) for t in study.trials)
    best_by_arch = {}
    for trial in complete:
        if "arch" in trial.params:
            best_by_arch[trial.params["arch"]] = max(trial.value, best_by_arch.get(trial.params["arch"], 0.0))
    return Row(
        study=name,
        complete=len(complete),
        pruned=states.count(optuna.trial.TrialState.PRUNED),
        failed=states.count(optuna.trial.TrialState.FAIL),
        wall_seconds=wall,
        best_val=best.value if best else None,
        best_test=best.user_attrs.get("test_accuracy") if best else None,
        train_share=inside / (wall * workers),
        best_by_arch=best_by_arch,
    )


def format_row(row: Row) -> str:
    def acc(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "-"
    minutes, seconds = divmod(round(row.wall_seconds), 60)
    flag = "  at chance" if row.best_val is None or row.best_val < 2 * CHANCE else ""
    by_arch = ", ".join(f"{arch} {value:.3f}" for arch, value in sorted(row.best_by_arch.items(), key=lambda item: -item[1]))
    return (f"| {row.study} | {row.complete} / {row.pruned} / {row.failed} | {minutes} min {seconds:02d} s | "
            f"{acc(row.best_val)} | {acc(row.best_test)} | {row.train_share:.0%} | {by_arch or '-'} |{flag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--study", action="append", help="only these studies (repeatable; default: every shipped study)")
    parser.add_argument("--log-model", choices=["best", "all", "none"], default="none", help="as launch's option (default: none)")
    parser.add_argument("--workers", type=int, default=1, help="trials at once, as launch's option (default: 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers must be >= 1; got {args.workers}", file=sys.stderr)
        return 1
    names = args.study or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"error: unknown study {', '.join(unknown)}; shipped: {', '.join(available())}", file=sys.stderr)
        return 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs, --trials {args.trials}, --preset cpu, --log-model {args.log_model}, --workers {args.workers}")
    print("| study | trials complete / pruned / failed | wall time | best val | its test | time in train() | best val by architecture |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"presets-{name}-") as home:
            print(format_row(run_study(name, args.trials, args.log_model, Path(home), args.workers)), flush=True)
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
