"""What the decisions after a search are worth, measured on one small CPU-preset study.

    python -m benchmarks.decisions                      # about 10 minutes on 2 busy cores
    python -m benchmarks.decisions --trials 6 --top 3 --seeds 2 --mo-trials 8

1. Confirm: a LeNet-BN study (its cpu preset) of --trials trials, then `confirm --top K --seeds S`: does the
   search's winner stay the winner, and how many of the top K keep their rank?
2. The cost model: its median absolute error, predicted against measured, over every complete trial here
   (training FLOPs, and device seconds from the throughput measured as the study ran).
3. Pruning accuracy,cost studies: the same --mo-trials configurations (random sampler, fixed seed: the draws do
   not depend on the results) launched with `--pruner none` and with the cost-bucket pruner; trials pruned,
   device time (the trials' wall seconds) and launch time, and the hypervolume of each study's Pareto front
   of complete trials (maximise validation accuracy, minimise training FLOPs; FLOPs divided by the largest
   any trial of either study used; reference point accuracy 0, cost 1.1).

Every command runs as a user runs it (`python -m study ...` in a subprocess) in a fresh study home.
Results go to benchmarks/decisions.json with their settings and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
description = "decisions benchmark: LeNet with batch norm, learning rate, epochs and input size"

[fixed]
arch = "lenet_bn"
batch_size = 64
momentum = 0.9
n_train = 512
n_val = 256
n_test = 256

[search]
lr = { low = 0.1, high = 1.0, log = true }
epochs = { low = 1, high = 3 }
resize = { choices = [28, 56] }

[sampler]
name = "random"
seed = 0

[pruner]
name = "median"
n_startup_trials = 2

[presets.cpu]
"""


def cli(home: Path, *args: str) -> float:
    """Run `python -m study ARGS` in `home`; returns its wall seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "study", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, "STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": "", "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise SystemExit(f"python -m study {' '.join(args)} failed:\n{result.stderr}")
    return time.perf_counter() - start


def hypervolume(points: list[tuple[float, float]], cost_scale: float) -> float:
    """2-D hypervolume of (accuracy to maximise, cost to minimise) against the reference (0, 1.1 × cost_scale), costs scaled to [0, 1]."""
    reference = 1.1
    # Sweep by increasing cost: up to the next point's cost, the dominated height is the best accuracy so far.
    area, best = 0.0, 0.0
    ordered = sorted((c / cost_scale, a) for a, c in points)
    for index, (cost, accuracy) in enumerate(ordered):
        best = max(best, accuracy)
        next_cost = ordered[index + 1][0] if index + 1 < len(ordered) else reference
        area += best * (min(next_cost, reference) - cost)
    return area


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--mo-trials", type=int, default=8)
    parser.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "decisions.json"))
    args = parser.parse_args(argv)

    import optuna
    from optuna.trial import TrialState

    from dashboards.confirmed import confirmed, load_companion, search_ranking
    from study.budget import median_abs, prediction_errors

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="decisions-"))
    spec = work / "bench.toml"
    spec.write_text(SPEC)

    def study(home: Path, name: str = "bench") -> optuna.Study:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(home / "optuna.journal")))
        return optuna.load_study(study_name=name, storage=storage)

    # 1. search, then confirm
    home = work / "confirm"
    search_seconds = cli(home, "launch", str(spec), "--trials", str(args.trials), "--preset", "cpu", "--log-model", "none")
    confirm_seconds = cli(home, "confirm", str(spec), "--top", str(args.top), "--seeds", str(args.seeds))
    searched = study(home)
    ranking = [t.number for t in search_ranking(searched)[:args.top]]
    rows = confirmed(searched, load_companion(searched))
    confirmed_order = [row.trial for row in rows]
    within_noise = [row.trial for row in rows[1:] if row.within_noise]

    # 2 and 3. the same configurations, unpruned and pruned
    fronts, mo = {}, {}
    for pruner in ("none", "median"):
        mo_home = work / f"mo-{pruner}"
        seconds = cli(mo_home, "launch", str(spec), "--trials", str(args.mo_trials), "--preset", "cpu", "--objective", "accuracy,cost",
                      "--cost", "train_flops", "--pruner", pruner, "--log-model", "none")
        trials = study(mo_home).get_trials()
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        fronts[pruner] = [(t.values[0], t.values[1]) for t in complete]
        mo[pruner] = {"launch_seconds": round(seconds, 1), "device_seconds": round(sum(t.user_attrs.get("wall_seconds", 0) for t in trials), 1),
                      "train_flops": sum(t.user_attrs.get("train_flops", 0) for t in trials),
                      "complete": len(complete), "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                      "epochs_trained": sum(t.user_attrs.get("epochs_run", 0) for t in trials), "trials": trials}
    scale = max(cost for points in fronts.values() for _, cost in points)
    for pruner, measured in mo.items():
        measured["hypervolume"] = round(hypervolume(fronts[pruner], scale), 4)

    everything = searched.get_trials() + load_companion(searched).get_trials() + mo["none"]["trials"] + mo["median"]["trials"]
    errors = prediction_errors(everything)
    for measured in mo.values():
        del measured["trials"]
    results = {
        "settings": {"trials": args.trials, "top": args.top, "seeds": args.seeds, "mo_trials": args.mo_trials, "spec": SPEC},
        "load_average": {"before": [round(v, 1) for v in load_before], "after": [round(v, 1) for v in os.getloadavg()]},
        "cpus": os.cpu_count(),
        "confirm": {"search_top": ranking, "confirmed_order": confirmed_order, "winner_stayed": confirmed_order[:1] == ranking[:1],
                    "kept_rank": sum(a == b for a, b in zip(ranking, confirmed_order)), "within_noise_of_best": within_noise,
                    "rows": [{"trial": r.trial, "search_rank": r.search_rank, "val_mean": round(r.val_mean, 4), "val_std": round(r.val_std, 4),
                              "test_mean": round(r.test_mean, 4), "test_std": round(r.test_std, 4),
                              "p_welch": None if r.p_value is None else round(r.p_value, 3)} for r in rows],
                    "search_seconds": round(search_seconds, 1), "confirm_seconds": round(confirm_seconds, 1)},
        "cost_model": {"complete_trials": len(errors["flops"]), "median_abs_error_flops": median_abs(errors["flops"]),
                       "median_abs_error_seconds": median_abs(errors["seconds"]),
                       "median_error_seconds": statistics.median(errors["seconds"]) if errors["seconds"] else None},
        "pruning": mo,
    }
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
