"""Confirmed rankings: a study's best configurations trained again with other seeds (`python -m study confirm`).

Each configuration's validation and test accuracy over its seeds (the search's own trial plus the
confirm trials of the companion study `<study>.confirm`), ranked by the mean validation accuracy.
Whether a configuration's mean differs from the confirmed best's beyond the seed noise is Welch's
two-sided t-test (unequal variances) on the validation accuracies: p >= 0.05 is "within noise".
The t distribution's tail is computed here exactly (regularised incomplete beta), so nothing beyond
the standard library is needed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

import records

NOISE_LEVEL = 0.05  # Welch's p at or above this: the difference is within the seed noise
TEST_NAME = "Welch's t-test (two-sided, unequal variances) on validation accuracy against the confirmed best"


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point; use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def welch_p_value(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that `a` and `b` have the same mean; None with fewer than 2 values in either."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if var_a + var_b == 0.0:
        return 1.0 if mean_a == mean_b else 0.0  # no spread at all: the means are equal or they are not
    t = (mean_a - mean_b) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(|T_df| >= |t|)


@dataclass
class Confirmed:
    """One configuration of the search, with every seed it trained with."""

    trial: int                # the search's trial
    search_rank: int          # 1: the search's winner
    seeds: list[int]
    val: list[float]
    test: list[float]
    config: dict
    p_value: float | None = None  # Welch against the confirmed best; None for the best itself or with too few seeds
    within_noise: bool = True

    @property
    def val_mean(self) -> float:
        return statistics.fmean(self.val)

    @property
    def val_std(self) -> float:
        return statistics.stdev(self.val) if len(self.val) > 1 else 0.0

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test) if self.test else math.nan

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0


def companion_name(study_name: str) -> str:
    return study_name + records.CONFIRM_SUFFIX


def load_companion(study: optuna.Study) -> optuna.Study | None:
    """The companion confirm study of `study` in its storage; None when confirm never ran."""
    name = companion_name(study.study_name)
    if name not in optuna.get_all_study_names(study._storage):
        return None
    return optuna.load_study(study_name=name, storage=study._storage)


def accuracy(trial: optuna.trial.FrozenTrial) -> float:
    """Validation accuracy: the first objective (also of an accuracy,cost study)."""
    return trial.values[0]


def search_ranking(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's complete trials, most accurate first: the order `confirm` takes its top K from."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-accuracy(t), t.number))


def confirmed(study: optuna.Study, companion: optuna.Study | None) -> list[Confirmed]:
    """The configurations confirm trained again, best confirmed mean first, each tested against the best."""
    if companion is None:
        return []
    again: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in companion.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        again.setdefault(trial.user_attrs[records.CONFIRM_OF], []).append(trial)
    rank = {trial.number: index + 1 for index, trial in enumerate(search_ranking(study))}
    rows = []
    for original in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if original.number not in again:
            continue
        runs = [original, *sorted(again[original.number], key=lambda t: t.number)]
        rows.append(Confirmed(
            trial=original.number, search_rank=rank[original.number],
            seeds=[records.config(t).get("seed", 0) for t in runs],
            val=[accuracy(t) for t in runs],
            test=[t.user_attrs["test_accuracy"] for t in runs if "test_accuracy" in t.user_attrs],
            config=records.config(original)))
    rows.sort(key=lambda row: (-row.val_mean, row.search_rank))
    for row in rows[1:]:
        row.p_value = welch_p_value(row.val, rows[0].val)
        row.within_noise = row.p_value is None or row.p_value >= NOISE_LEVEL
    return rows


def verdict(rows: list[Confirmed]) -> str:
    """One sentence: whether the search's winner is the confirmed winner, and which others the noise cannot tell apart."""
    if not rows:
        return "no configuration confirmed yet: run `python -m study confirm NAME`"
    best = rows[0]
    seeds = f"{len(best.val)} seeds each" if len({len(r.val) for r in rows}) == 1 else "their seeds"
    searched = next((row for row in rows if row.search_rank == 1), None)
    if best.search_rank == 1:
        head = f"The search's winner, trial {best.trial}, is also the confirmed winner ({best.val_mean:.4f} ± {best.val_std:.4f} over {seeds})."
    else:
        was = f"trial {searched.trial} ({searched.val_mean:.4f} ± {searched.val_std:.4f})" if searched else "its winner"
        head = (f"The search's winner is NOT the confirmed winner: trial {best.trial}, ranked {best.search_rank} by the search, has the best "
                f"confirmed mean ({best.val_mean:.4f} ± {best.val_std:.4f} over {seeds}), against {was}.")
    close = [str(row.trial) for row in rows[1:] if row.within_noise]
    tail = (f" Within noise of it (p >= {NOISE_LEVEL}): trial{'s' if len(close) > 1 else ''} {', '.join(close)}." if close
            else " Every other confirmed configuration is below it beyond the noise (p < 0.05).")
    return head + (tail if len(rows) > 1 else "")
