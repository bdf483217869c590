"""End to end through the CLI (`study.cli.main`, as `python -m study` runs it): real journal file, real SQLite MLflow store."""

import os
import re
import subprocess
import sys

import optuna
from mlflow.tracking import MlflowClient

from conftest import LENET, ROOT, journal, make_spec, postgres_database, run_main
from objectives import ARCHITECTURES


def _mlflow_runs(home, experiment):
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_launch_records_every_trial_in_optuna_and_mlflow(tiny_study):
    # The Optuna storage holds three finished trials: the enqueued notes' default first, the diverged one FAIL.
    study = optuna.load_study(study_name="tiny", storage=journal(tiny_study))
    trials = study.get_trials()
    assert [t.state.name for t in trials][:2] == ["COMPLETE", "FAIL"]
    assert trials[0].params == {"lr": 0.05, "epochs": 2, "resize": 32, "ratio": 16}
    assert all(t.state.is_finished() for t in trials) and len(trials) == 3
    assert trials[1].user_attrs["fail_reason"].startswith("diverged")

    # MLflow: one parent, one nested child per trial, per-epoch metrics with step = epoch.
    client, runs = _mlflow_runs(tiny_study, "tiny")
    parents = [r for r in runs if r.data.tags.get("study.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3 and len(runs) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"trial-0", "trial-1", "trial-2"}
    for trial in trials:
        run = by_name[f"trial-{trial.number}"]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}[trial.state.name]
        assert run.data.params["lr"] == str(trial.params["lr"]) and run.data.params["arch"] == "vgg11"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        if trial.state.name != "FAIL":
            assert sorted(m.step for m in history) == list(range(1, trial.user_attrs["epochs_run"] + 1))
            assert run.data.metrics["test_accuracy"] == trial.user_attrs["test_accuracy"]
            assert run.data.metrics["flops_per_example"] > 0
    assert by_name["trial-1"].data.tags["optuna.fail_reason"].startswith("diverged")
    assert parents[0].info.status == "FINISHED"

    # The report exists, is self-contained, and carries the three plots with data.
    page = (tiny_study / "reports" / "tiny.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", page)
    assert "plotly.js v" in page or "Plotly" in page
    for div in ("plot-cost", "plot-history", "plot-curves"):
        assert f'id="{div}"' in page
    assert "Pareto front" in page

    # `show` prints the best trials.
    shown = run_main("show", "tiny", env={"STUDY_HOME": str(tiny_study), "MLFLOW_TRACKING_URI": None})
    assert shown.returncode == 0, shown.stderr
    assert "3 trials" in shown.stdout and "val_accuracy" in shown.stdout


def test_a_launch_says_what_it_ran_and_resumes_to_the_total(study_home, tiny_spec):
    first = run_main("launch", str(tiny_spec), "--trials", "2")
    assert first.returncode == 0, first.stderr
    assert re.search(r"trial 1: .* -> FAIL \(diverged", first.stdout)
    report = study_home / "reports" / "tiny.html"
    assert str(report) in first.stdout.replace("\n", "") and report.exists()

    # `--trials` is the total: a relaunch runs only what is missing, under the same parent run.
    storage = journal(study_home)
    again = run_main("launch", str(tiny_spec), "--trials", "3")
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="tiny", storage=storage).get_trials()) == 3
    _, runs = _mlflow_runs(study_home, "tiny")
    assert sum(r.data.tags.get("study.role") == "parent" for r in runs) == 1 and len(runs) == 4
    done = run_main("launch", str(tiny_spec), "--trials", "3")
    assert "already holds 3 finished trials" in done.stdout

    # A study keeps its preset.
    mixed = run_main("launch", str(tiny_spec), "--trials", "5", "--preset", "full")
    assert mixed.returncode == 1 and "was created with preset" in mixed.stderr


def test_postgresql_storage(study_home, tiny_spec):
    with postgres_database("cli") as url:
        result = run_main("launch", str(tiny_spec), "--trials", "2", "--storage", url)
        assert result.returncode == 0, result.stderr
        study = optuna.load_study(study_name="tiny", storage=url)
        assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL"]
        assert run_main("show", "tiny", "--storage", url).returncode == 0
        optuna.storages.RDBStorage(url).engine.dispose()


def _one_line_error(result, *fragments):
    assert result.returncode == 1
    assert result.stdout == "" or "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_user_mistakes_are_one_line_errors(study_home, tmp_path, tiny_spec):
    _one_line_error(run_main("launch", "vgg_ratoi", "--trials", "2"), "unknown study 'vgg_ratoi'", "vgg_ratio")
    small = tmp_path / "small.toml"
    small.write_text(tiny_spec.read_text().replace("resize = { choices = [32] }", "resize = { choices = [16, 32] }"))
    _one_line_error(run_main("launch", str(small), "--trials", "2"), "vgg11 needs resize >= 32", "got 16")
    broken = tmp_path / "broken.toml"
    broken.write_text("[fixed\narch = 'vgg11'\n")
    _one_line_error(run_main("launch", str(broken)), "broken.toml", "line 1")
    _one_line_error(run_main("launch", str(tiny_spec), "--trials", "0"), "--trials must be >= 1")
    _one_line_error(run_main("launch", str(tiny_spec), "--storage", "postgresql://nobody@127.0.0.1:1/none"), "cannot open storage")
    _one_line_error(run_main("launch", str(tiny_spec), "--data-dir", str(tmp_path / "nowhere")), "does not exist")
    _one_line_error(run_main("show", "never_launched"), "no study named 'never_launched'")
    _one_line_error(run_main("report", "never_launched"), "no study named 'never_launched'")
    _one_line_error(run_main("launch", str(tiny_spec), "-o", str(tmp_path / "missing" / "r.html")), "directory", "does not exist")
    _one_line_error(run_main("launch", str(tiny_spec), "-o", str(tmp_path / "r.txt")), "ending in .html")
    # Nothing was written by any of these, not even the study home.
    assert not study_home.exists()


def test_list_shows_every_spec():
    result = run_main("list", "--preset", "full")  # the notes' ranges; a plain `list` shows the preset this machine runs
    assert result.returncode == 0
    assert re.search(r"^vgg_ratio +arch vgg11, lr 0.005..0.2 log, epochs 2..12, resize \{32, 64, 96, 128, 224\}, ratio \{1, 2, 4, 8, 16\}$", result.stdout, re.MULTILINE)
    for arch in ARCHITECTURES:
        assert re.search(rf"^{arch}_lr_epochs +arch {arch}, lr ", result.stdout, re.MULTILINE)
    assert re.search(r"^zoo +arch \{lenet, .*\[vgg11: resize 32..224 step 32, ratio 1..8\]", result.stdout, re.MULTILINE)
    assert re.search(r"^alexnet_resize +arch \{alexnet, alexnet_28\}", result.stdout, re.MULTILINE)


def test_help_imports_no_heavy_library():
    """`python -m study --help` answers at once: a fresh interpreter shows the help without importing torch, Optuna or MLflow."""
    probe = ("import runpy, sys\nsys.argv = ['study', '--help']\ntry:\n    runpy.run_module('study', run_name='__main__')\n"
             "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
             "print('imported:', sorted(name for name in ('torch', 'optuna', 'mlflow') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "launch" in result.stdout and result.stdout.strip().endswith("imported: []"), result.stdout[-500:]


def test_a_study_that_learned_nothing_says_so_in_launch_show_and_the_report(study_home, tmp_path):
    # lr 1e-7..1e-6 for one epoch on 256 images: the weights barely move, every trial stays at chance.
    spec = make_spec(tmp_path, "stuck", LENET, search={"lr": {"low": 1e-7, "high": 1e-6, "log": True}})
    launched = run_main("launch", str(spec), "--trials", "2")
    assert launched.returncode == 0, launched.stderr
    # The launch's last words (rich wraps them to the terminal's width).
    warning = re.search(r"no better than chance: [^\n]*(\n[^\n]+)*\Z", launched.stdout.strip())[0]
    warning = " ".join(warning.split())
    assert re.match(r"no better than chance: the study's best val_accuracy is 0\.1\d{3} over 2 complete trials \(chance is 0\.10", warning)
    assert "the budget of preset cpu (256 training images, 1 epoch)" in warning and "the learning rate (lr " in warning
    shown = run_main("show", "stuck")
    assert shown.returncode == 0 and " ".join(shown.stdout.split("\n", 1)[1].split()).startswith(warning)  # under the header line
    html = (study_home / "reports" / "stuck.html").read_text()
    summary = html[html.index('id="summary"'):]
    assert summary.index('<p class="chance">no better than chance: the study') < summary.index("trials</b>")


def test_a_count_of_one_is_singular(study_home, tmp_path):
    spec = make_spec(tmp_path, "single", LENET)
    created = run_main("create", str(spec), "--trials", "1")
    assert created.returncode == 0, created.stderr
    assert ": 1 trial, preset" in created.stdout, created.stdout
    again = run_main("create", str(spec))
    assert "(1 trial, preset" in again.stdout, again.stdout
    shown = run_main("show", "single")
    assert "0 trials" in shown.stdout and "1 trials" not in shown.stdout, shown.stdout


def _flat(text: str) -> str:
    """Text without its line breaks, backticks and hyphenation breaks, to compare what two places say."""
    return re.sub(r"\s+", " ", re.sub(r"-\n\s*", "-", text.replace("`", "")))


def test_launch_help_says_what_the_docs_say_of_objective_sampler_and_pruner():
    docs = _flat((ROOT / "docs" / "commands.md").read_text())
    shown = run_main("launch", "--help")
    assert shown.returncode == 0
    help_text = _flat(shown.stdout)
    assert "no pruning" not in help_text
    for said in (("Optuna cannot prune multi-objective studies, so these are pruned by the platform on validation accuracy alone, "
                 "against trials of similar cost"), "--pruner none runs every trial to its end", "every combination of the spec's choices",
                 "the spec's [sampler]"):
        assert said in docs and said in help_text, said
    for flag in ("sampler", "pruner"):
        choices = re.search(rf"\[--{flag} ([a-z|]+)\]", docs)[1].split("|")
        assert re.search(", ".join(choices[:-1]) + f" or {choices[-1]}", help_text), (flag, choices)
    assert "override the spec's [sampler] and [pruner] tables" in docs and "overrides the spec's [pruner]" in help_text
    assert "default TPE and the median pruner" in docs and "(default tpe)" in help_text and "(default median)" in help_text


def test_the_storage_line_of_the_docs_names_every_storage_kind():
    from study.storage import STORAGE_KINDS

    text = (ROOT / "docs" / "commands.md").read_text()
    bullet = _flat(re.search(r"^- `--storage` takes.*?(?=^- )", text, re.DOTALL | re.MULTILINE)[0])
    assert [kind.name for kind in STORAGE_KINDS if kind.example not in bullet] == [], bullet
