"""Records that say what happened: a trial that trained every epoch is COMPLETE, the parent run names the pruner that
acts, every failed trial says why (a stopped heartbeat too), the preset line names what applies, the help points at
the section that exists, and no command prints a third-party warning."""

from __future__ import annotations

import re

import optuna
import pytest
from mlflow.tracking import MlflowClient
from reliability.checks import check_consistent

import records
from conftest import LENET, ROOT, journal, make_spec, run_cli, run_main

# Two trials of one epoch each: the first (lr 0.2) reaches 0.125 validation accuracy, the second (lr 1e-9) learns
# nothing (0.070). A median pruner with one startup trial, asked after that epoch, would prune the second.
LAST_EPOCH = {**LENET, "fixed": {**LENET["fixed"], "arch": "lenet_bn"}, "search": {"lr": {"low": 1e-9, "high": 0.2, "log": True}},
              "enqueue": [{"lr": 0.2}, {"lr": 1e-9}], "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0}}


@pytest.mark.parametrize("objective", ["accuracy", "accuracy,cost"])
def test_a_trial_that_trained_every_epoch_is_complete(study_home, tmp_path, objective):
    spec = make_spec(tmp_path, "whole", LAST_EPOCH)
    result = run_main("launch", str(spec), "--trials", "2", "--objective", objective)
    assert result.returncode == 0, result.stderr
    first, second = optuna.load_study(study_name="whole", storage=journal(study_home)).get_trials()
    accuracy = [t.user_attrs[records.VAL_CURVE][-1] if records.VAL_CURVE in t.user_attrs else t.value for t in (first, second)]
    assert accuracy[1] < accuracy[0]  # below the median of the trials before it: the pruner would stop it
    assert second.state.name == "COMPLETE" and second.user_attrs["epochs_run"] == 1, result.stdout

    # The parent run names the pruner that acts: Optuna's median pruner, or in an accuracy,cost study (which Optuna
    # cannot prune) the cost-bucket pruner.
    client = MlflowClient(tracking_uri=f"sqlite:///{study_home / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("whole").experiment_id], filter_string="tags.`study.role` = 'parent'")
    assert parent.data.params["pruner"] == ("MedianPruner" if objective == "accuracy" else "CostBucketPruner")
    # A spec without a [presets.cpu] table runs as written, and the launch says so.
    assert re.search(r"whole\.toml has no \[presets\.(cpu|full)\] settings, so it runs as written", result.stdout), result.stdout


def test_the_preset_line_names_what_the_table_sets():
    from study.session import choose_preset
    from study.specs import load_spec

    preset, why = choose_preset("cpu", load_spec("vgg_ratio"))
    assert preset == "cpu" and "vgg_ratio.toml [presets.cpu] sets n_train=8192" in why and "ratio {4, 8}" in why
    assert choose_preset("full", load_spec("vgg_ratio"))[1] == "as requested; vgg_ratio.toml has no [presets.full] settings, so it runs as written"


def test_a_trial_failed_by_a_stopped_heartbeat_says_why(study_home, tmp_path):
    from study.storage import open_storage

    spec = make_spec(tmp_path, "beat", LENET)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert run_main("launch", str(spec), "--trials", "1", "--storage", url, "--heartbeat", "1").returncode == 0
    # A trial whose worker is gone: it beat once, then nothing beats for it any more.
    storage = open_storage(url, heartbeat=1)
    trial = optuna.load_study(study_name="beat", storage=storage).ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)})
    trial.set_user_attr(records.HOST, "gone-host")
    trial.set_user_attr(records.PID, 4242)
    storage.record_heartbeat(trial._trial_id)

    # The next launch waits while that trial could still finish, then fails it as stale and runs it again.
    result = run_main("launch", str(spec), "--trials", "2", "--storage", url, "--heartbeat", "1")
    assert result.returncode == 0, result.stderr
    reason = "worker stopped sending heartbeats (host gone-host, pid 4242)"
    assert f"trial {trial.number}: {reason}; marked FAIL and queued again" in result.stdout
    dead = optuna.load_study(study_name="beat", storage=url).trials[trial.number]
    assert dead.state.name == "FAIL" and dead.user_attrs[records.FAIL_REASON] == reason and dead.user_attrs[records.INTERRUPTED]
    # Optuna's fail_reason and MLflow's optuna.fail_reason agree, and the trial ran again once.
    assert check_consistent("beat", url, f"sqlite:///{study_home / 'mlflow.db'}", total=2).lost == 0
    optuna.storages.RDBStorage(url).engine.dispose()


def test_the_budget_help_points_at_its_section():
    result = run_main("launch", "--help")
    text = re.sub(r"-\s+", "-", " ".join(result.stdout.split()))  # argparse wraps lines after hyphens
    pointer = re.search(r"see (docs/[\w-]+\.md)#(\w+)", text)
    assert pointer, result.stdout
    assert f"## {pointer[2].capitalize()}" in (ROOT / pointer[1]).read_text()


@pytest.mark.slow
def test_no_command_prints_a_third_party_warning(tmp_path):
    """Each command in a whole new interpreter, as a user starts it (warnings are printed once per process); `ui`'s
    standard error is checked in test_mlflow_ui.py, where its server runs."""
    env = {"STUDY_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": None}
    # Two architectures, one with a parameter of its own: Optuna's parameter importance (the report) warns about such.
    spec = make_spec(tmp_path, "quiet", LENET, fixed={"arch": None}, search={"arch": {"choices": ["lenet", "lenet_bn"]}},
                     conditional={"lenet": {"resize": {"low": 28, "high": 28}}},
                     enqueue=[{"arch": "lenet", "lr": 0.05, "resize": 28}, {"arch": "lenet_bn", "lr": 0.05}, {"arch": "lenet", "lr": 0.1, "resize": 28}])
    database = f"sqlite:///{tmp_path / 'optuna.db'}"  # Optuna warns about heartbeats on a relational storage
    commands = [["list"], ["inspect", "lenet"], ["launch", str(spec), "--trials", "3"], ["launch", str(spec), "--trials", "1", "--storage", database],
                ["show", "quiet"], ["export", "quiet", "-o", str(tmp_path / "quiet.csv")], ["report", "quiet"],
                ["confirm", str(spec), "--top", "1", "--seeds", "1"], ["finalize", "quiet"]]
    errors = {}
    for argv in commands:
        result = run_cli(*argv, env=env, fresh=True)
        assert result.returncode == 0, result.stderr
        errors[" ".join(argv)] = result.stderr
    warnings = {name: [line for line in text.splitlines() if "Warning" in line] for name, text in errors.items()}
    assert not any(warnings.values()), warnings
