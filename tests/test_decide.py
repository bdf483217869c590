"""After the search: `launch --budget`, `confirm` and `finalize` end to end (real training on small subsets, real
MLflow, real Optuna storage), the report's confirmed ranking and cost-model plot in Chromium, and the pieces
they rest on (Welch's test, budget parsing, the cost-bucket pruner)."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ARTIFACTS, LENET, journal, make_spec, run_cli, run_main

# Small enough to train a few times in a test; the FLOPs of each configuration are exact, whatever the machine.
DECIDE = {
    "fixed": {"arch": "vgg11", "batch_size": 32, "momentum": 0.9, "resize": 32, "ratio": 16, "n_train": 128, "n_val": 64, "n_test": 64},
    "search": {"lr": {"low": 0.01, "high": 0.1, "log": True}, "epochs": {"low": 1, "high": 2}},
    "enqueue": [{"lr": 0.05, "epochs": 1}],
    "pruner": {"name": "median", "n_startup_trials": 2},
}
EPOCH_FLOPS_LIMIT = 4.5  # the budget, in units of one epoch's predicted FLOPs: room for 2 to 4 trials


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("decide")


@pytest.fixture(scope="module")
def env(home):
    return {"STUDY_HOME": str(home / "studies"), "MLFLOW_TRACKING_URI": ""}


@pytest.fixture(scope="module")
def epoch_flops():
    from objectives.train import TrainConfig
    from study.budget import predicted_flops

    return predicted_flops(TrainConfig(arch="vgg11", resize=32, ratio=16, epochs=1, n_train=128))


@pytest.fixture(scope="module")
def launched(home, env, epoch_flops):
    spec = make_spec(home, "decide", DECIDE)
    result = run_cli("launch", str(spec), "--trials", "20", "--preset", "cpu", "--budget", f"{EPOCH_FLOPS_LIMIT * epoch_flops:.6g}", env=env)
    assert result.returncode == 0, result.stderr
    return result


def _study(home, name="decide"):
    return optuna.load_study(study_name=name, storage=journal(home / "studies"))


def _client(home) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'studies' / 'mlflow.db'}")


@pytest.mark.slow
def test_a_flops_budget_stops_the_study_before_a_trial_that_would_not_fit(launched, home, epoch_flops):
    budget = EPOCH_FLOPS_LIMIT * epoch_flops
    trials = _study(home).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    refused = [t for t in trials if t.user_attrs.get("over_budget")]
    assert "budget reached" in launched.stdout, launched.stdout
    assert 2 <= len(complete) < 20
    used = sum(t.user_attrs.get("train_flops", 0) for t in trials)  # pruned trials spent FLOPs too
    assert used <= budget  # what ran fits
    # The trial that stopped the study did not fit: what was used plus its prediction exceeds the budget.
    assert len(refused) == 1 and refused[0].state == optuna.trial.TrialState.FAIL
    assert used + refused[0].user_attrs["predicted_flops"] > budget
    assert "over budget" in refused[0].user_attrs["fail_reason"]
    # Queued again with the same params, for a launch with a larger budget.
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs.get("retry_of") for t in waiting] == [refused[0].number]
    # Every trial recorded its predicted cost; the FLOPs prediction is the trainer's measurement within 10%.
    for t in complete:
        assert t.user_attrs["predicted_flops"] == pytest.approx(t.user_attrs["train_flops"], rel=0.1)
        assert t.user_attrs["predicted_seconds"] > 0
    # MLflow: the refused trial's run is FAILED with the reason; the others FINISHED.
    client = _client(home)
    experiment_id = client.get_experiment_by_name("decide").experiment_id
    parent = client.search_runs([experiment_id], filter_string="tags.`study.role` = 'parent'")[0]
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert runs[refused[0].number].info.status == "FAILED"
    assert "over budget" in runs[refused[0].number].data.tags["optuna.fail_reason"]
    assert all(runs[t.number].info.status == "FINISHED" for t in complete)


def test_confirm_names_its_runs_and_confirm_and_finalize_rewrite_the_report(study_home, tmp_path):
    spec = make_spec(tmp_path, "recorded", LENET)
    assert run_main("launch", str(spec), "--trials", "2").returncode == 0
    report = study_home / "reports" / "recorded.html"
    assert "No confirmed configurations" in report.read_text()
    confirm = run_main("confirm", str(spec), "--top", "1", "--seeds", "2")
    assert confirm.returncode == 0, confirm.stderr
    assert f"report:         {report}" in confirm.stdout
    text = report.read_text()
    assert "No confirmed configurations" not in text and "confirmed rank" in text
    # Each confirm run is named for what it is: the search's trial it trains again, and the seed.
    companion = optuna.load_study(study_name="recorded.confirm", storage=journal(study_home))
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recorded.confirm")
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    assert names == {f"confirm-{t.user_attrs['confirm_of']}-seed-{t.user_attrs['confirm_seed']}" for t in companion.trials}, names
    assert len(names) == 2
    report.unlink()
    final = run_main("finalize", "recorded")
    assert final.returncode == 0, final.stderr
    assert f"report:         {report}" in final.stdout and "confirmed rank" in report.read_text()


@pytest.mark.slow
def test_confirm_trains_the_best_again_with_other_seeds(launched, home, env):
    study = _study(home)
    ranking = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    top = {t.number for t in ranking[:2]}
    result = run_cli("confirm", str(home / "decide.toml"), "--top", "2", "--seeds", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert "4 trainings to run" in result.stdout and "±" in result.stdout and "Welch" in result.stdout

    companion = _study(home, "decide.confirm")
    confirm_trials = companion.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(confirm_trials) == 4
    assert {t.user_attrs["confirm_of"] for t in confirm_trials} == top
    for t in confirm_trials:
        source = study.trials[t.user_attrs["confirm_of"]]
        own, other = dict(source.user_attrs["config"]), dict(t.user_attrs["config"])
        assert own.pop("seed") == 0 and other.pop("seed") in (1, 2)
        assert own == other  # the same configuration and split; only the seed differs
    seeds = {(t.user_attrs["confirm_of"], t.user_attrs["config"]["seed"]) for t in confirm_trials}
    assert seeds == {(n, s) for n in top for s in (1, 2)}

    # MLflow: the companion's experiment, one FINISHED child run per confirm trial, tagged with the original trial.
    client = _client(home)
    experiment = client.get_experiment_by_name("decide.confirm")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'parent'")[0]
    assert parent.data.tags["confirm.original_study"] == "decide"
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        original = study.trials[int(run.data.tags["confirm.original_trial"])]
        assert run.data.tags["confirm.original_run_id"] == original.user_attrs["mlflow_run_id"]
        assert run.data.params["seed"] == run.data.tags["seed"]
        assert "val_accuracy" in run.data.metrics and "test_accuracy" in run.data.metrics

    # Again: nothing is missing, nothing trains; `show` ranks by the confirmed mean.
    again = run_cli("confirm", str(home / "decide.toml"), "--top", "2", "--seeds", "2", env=env)
    assert again.returncode == 0 and "0 trainings to run" in again.stdout
    assert len(_study(home, "decide.confirm").get_trials()) == 4
    show = run_cli("show", "decide", env=env)
    assert show.returncode == 0, show.stderr
    assert "confirmed ranking" in show.stdout and "confirmed winner" in show.stdout
    assert "cost model" in show.stdout and "median absolute error" in show.stdout


@pytest.mark.slow
def test_finalize_trains_on_train_and_validation_and_registers_the_model(launched, home, env):
    from dashboards.confirmed import confirmed, load_companion

    study = _study(home)
    chosen = confirmed(study, load_companion(study))[0].trial if load_companion(study) else max(
        study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.value).number
    result = run_cli("finalize", "decide", env=env)
    assert result.returncode == 0, result.stderr
    assert f"trial {chosen}'s configuration" in result.stdout and "registered decide-final version 1" in result.stdout

    client = _client(home)
    experiment = client.get_experiment_by_name("decide")
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'final'")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.`study.role` = 'parent'")[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "final"
    assert run.data.tags["study.parent_run_id"] == parent.info.run_id
    assert run.data.tags["final.source_trial"] == str(chosen)
    assert run.data.params["n_train_final"] == str(128 + 64)  # the trials' train subset and validation subset together
    assert "test_accuracy" in run.data.metrics and "val_accuracy" not in run.data.metrics  # validation is not used to report it
    assert run.data.metrics["param_count"] > 0 and "params" not in run.data.metrics
    epochs = study.trials[chosen].user_attrs["config"]["epochs"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, epochs + 1))
    [version] = client.search_model_versions("name = 'decide-final'")
    assert version.run_id == run.info.run_id

    import mlflow.pytorch
    import torch

    # The version's source is models:/<id>; its files are at the logged model's artifact location in this store.
    model = mlflow.pytorch.load_model(client.get_logged_model(version.source.removeprefix("models:/")).artifact_location)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)

    wrong = run_cli("finalize", "decide", "--trial", "999", env=env)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "--trial 999" in wrong.stderr


@pytest.mark.slow
def test_report_shows_the_confirmed_ranking_and_the_cost_model(launched, home, env, page):
    if "decide.confirm" not in optuna.get_all_study_names(journal(home / "studies")):
        run_cli("confirm", str(home / "decide.toml"), "--top", "2", "--seeds", "2", env=env)
    output = home / "decide.html"
    result = run_cli("report", "decide", "-o", str(output), env=env)
    assert result.returncode == 0, result.stderr
    page.goto(output.as_uri())
    page.wait_for_selector("#plot-cost-model .main-svg")
    page.wait_for_selector("#plot-confirmed-0 .main-svg")
    rows = page.locator("#confirmed-0 tbody tr")
    assert rows.count() == 2
    assert "±" in rows.nth(0).inner_text() and "best" in rows.nth(0).inner_text()
    assert "Welch" in page.locator("#confirmed").inner_text()
    assert "confirmed winner" in page.locator("#confirmed .verdict").inner_text()
    assert "Median absolute error" in page.locator("#cost-model-error").inner_text()
    # The cost plot has a point per trial that trained in each panel, and the diagonal.
    points = page.evaluate("() => document.getElementById('plot-cost-model').data.filter(t => t.mode === 'markers').reduce((n, t) => n + t.x.length, 0)")
    # Complete and pruned trials alike: both have a prediction and a measurement (pruned ones below the diagonal).
    measured = [t for t in _study(home).get_trials() if "predicted_flops" in t.user_attrs and "train_flops" in t.user_attrs]
    assert points == 2 * len(measured) and measured
    page.locator("#confirmed").screenshot(path=str(ARTIFACTS / "report-confirmed.png"))
    page.locator("#cost-model").screenshot(path=str(ARTIFACTS / "report-cost-model.png"))


def test_welch_p_value_matches_the_textbook():
    from dashboards.confirmed import welch_p_value

    scipy_stats = pytest.importorskip("scipy.stats")
    generator = random.Random(7)
    for n, m in ((2, 2), (3, 5), (4, 4), (8, 3)):
        a = [generator.gauss(0.80, 0.01) for _ in range(n)]
        b = [generator.gauss(0.81, 0.02) for _ in range(m)]
        assert welch_p_value(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert welch_p_value([0.5], [0.4, 0.6]) is None
    assert welch_p_value([0.5, 0.5], [0.5, 0.5]) == 1.0


def test_welch_p_value_by_hand():
    """Without scipy: here t = -1/sqrt(2) with 2 degrees of freedom, and the t(2) distribution's two-sided tail has the
    closed form p = 1 - |t| / sqrt(2 + t^2) = 1 - 1/sqrt(5)."""
    from dashboards.confirmed import welch_p_value

    assert welch_p_value([0.0, 2.0], [1.0, 3.0]) == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-12)


@pytest.mark.parametrize(("text", "amount", "unit"), [("2h", 7200, "seconds"), ("30m", 1800, "seconds"), ("90s", 90, "seconds"),
                                                      ("1.5h", 5400, "seconds"), ("5e15", 5e15, "flops")])
def test_budget_parses_time_and_flops(text, amount, unit):
    from study.budget import Budget

    assert Budget.parse(text) == Budget(amount, unit)


@pytest.mark.parametrize("text", ["2 days", "-5", "0", "inf", "nan", "h"])
def test_a_bad_budget_names_the_flag(text):
    from study.budget import Budget

    with pytest.raises(ValueError, match="--budget"):
        Budget.parse(text)


def test_a_bad_budget_is_one_line(study_home, tiny_spec):
    result = run_cli("launch", str(tiny_spec), "--budget", "2 days", env={"STUDY_HOME": str(study_home)})
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--budget 2 days" in result.stderr


def test_cost_bucket_pruner_compares_only_trials_of_similar_cost():
    from study.costprune import CostBucketPruner, bucket

    study = optuna.create_study(directions=["maximize", "minimize"])
    small, large = 1e9, 1e12  # predicted FLOPs of one epoch: different buckets
    for accuracy in (0.8, 0.9):
        study.add_trial(optuna.trial.create_trial(values=[accuracy, 1.0], user_attrs={
            "predicted_flops": large, "config": {"epochs": 1}, "val_curve": [accuracy]}))
    pruner = CostBucketPruner(n_startup_trials=2)
    assert bucket(small, 1) != bucket(large, 1)
    assert pruner.should_prune(study, bucket(large, 1), 1, 0.7)       # below the median of its bucket
    assert not pruner.should_prune(study, bucket(large, 1), 1, 0.95)
    assert not pruner.should_prune(study, bucket(small, 1), 1, 0.1)   # no peers of its cost: never pruned


def test_the_final_split_is_train_and_validation_together(fashion):
    merged = fashion.with_validation_in_train(100, 40)
    assert len(merged.train_labels) == 140 and len(merged.val_labels) == 0
    assert (merged.train_images[100:] == fashion.val_images[:40]).all()
    assert len(fashion.with_validation_in_train().train_labels) == 60_000
    assert len(merged.test_labels) == len(fashion.test_labels)


@pytest.mark.parametrize("width", [80, 120])
def test_the_confirmed_ranking_shows_its_headers_whole(width):
    from rich.console import Console

    from dashboards.confirmed import Confirmed
    from study.views import print_confirmed

    rows = [Confirmed(12, 1, [1, 2, 3], [0.8412, 0.8391, 0.8455], [0.8377, 0.8401, 0.8420], {}, None, False),
            Confirmed(7, 2, [1, 2, 3], [0.8398, 0.8350, 0.8421], [0.8366, 0.8312, 0.8390], {}, 0.4123, True)]
    console = Console(width=width, record=True)
    print_confirmed(console, rows)
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines) and "…" not in text, text
    # Each header whole, if wrapped then between its words or after an underscore.
    words = text.split()
    for part in ("confirmed", "rank", "trial", "search", "seeds", "val_", "test_", "accuracy", "(Welch)", "vs", "best"):
        assert part in words or part.rstrip("_") + "_accuracy" in words, (part, text)
