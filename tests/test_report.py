"""The HTML report: every section from a real small study, two studies on one page, PNGs, edge cases, in a real Chromium.
And accuracy,cost studies end to end: their learning curves in the report, their export with one column per name."""

from __future__ import annotations

import re
import shutil

import optuna
import pandas as pd
import pyarrow.csv
import pyarrow.parquet
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import ARTIFACTS, LENET, journal, make_spec, run_main
from dashboards import write_report
from study.cli import main

# AlexNet against the 28-px variant at their smallest, on a few hundred images. The enqueued trials
# make the states certain: trial 0 completes, trial 1 diverges (FAIL), trial 2 completes with the other
# architecture (its 2 epochs stay inside the pruner's warm-up), trial 3 cannot learn at lr 1e-7 and falls
# below trial 0 at epoch 3 of its 4 (PRUNED), trial 4 completes (2 epochs). None is drawn: lr's range only holds the first trials' values.
PAIR_SPEC = """
description = "AlexNet and its 28-px variant, tiny, for report tests"

[fixed]
batch_size = 32
momentum = 0.9
ratio = 8
n_train = 512
n_val = 128
n_test = 128
precision = "fp32"

[search]
arch = { choices = ["alexnet", "alexnet_28"] }
lr = { low = 1e-7, high = 1e12, log = true }  # holds every first trial's lr; no trial is drawn
epochs = { low = 1, high = 4 }

[[enqueue]]
arch = "alexnet_28"
lr = 0.02
epochs = 3

[[enqueue]]
arch = "alexnet"
lr = 1e12
epochs = 1

[[enqueue]]
arch = "alexnet"
lr = 0.02
epochs = 2

[[enqueue]]
arch = "alexnet_28"
lr = 1e-7
epochs = 4  # pruned after epoch 3: a trial is never pruned after its last epoch

[[enqueue]]
arch = "alexnet_28"
lr = 0.03
epochs = 2

[pruner]
name = "median"
n_startup_trials = 1
n_warmup_steps = 3

[presets.cpu.conditional.alexnet]
resize = { low = 65, high = 65 }
"""
SECTIONS = ("summary", "confirmed", "cost", "cost-model", "alexnet", "curves", "search", "layers", "table")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_study):
    """One study home with two launched studies: `pair` (5 trials, two architectures) and `tiny` (3 trials of VGG-11, a copy of the shared one)."""
    home = tmp_path_factory.mktemp("report") / "home"
    shutil.copytree(tiny_study, home)
    path = home.parent / "pair.toml"
    path.write_text(PAIR_SPEC)
    result = run_main("launch", str(path), "--trials", "5", env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    storage = journal(home)
    states = [t.state for t in optuna.load_study(study_name="pair", storage=storage).get_trials()]
    assert states[:4] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]
    return home


def _watch(page) -> list[str]:
    """Collect console errors, page errors and any request that leaves the machine."""
    errors = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route("http*://**", lambda route: (errors.append(f"network request {route.request.url}"), route.abort()))
    return errors


def _plots_drawn(page) -> list[str]:
    """Ids of every Plotly div, after checking that each was drawn with data."""
    page.wait_for_load_state("load")
    ids = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => div.id)")
    for plot in ids:
        # calcdata: what Plotly computed from the trace data and drew.
        page.wait_for_function(f"document.getElementById('{plot}').calcdata !== undefined")
        assert page.evaluate(f"document.getElementById('{plot}').calcdata.some(trace => trace.length > 0)"), f"{plot} has no data"
        assert page.locator(f"#{plot} .main-svg").count() > 0, f"{plot} was not drawn"
    return ids


@pytest.mark.slow  # the `home` fixture trains two AlexNet studies (half a minute); the fast tier's report tests use small ones
def test_report_sections_png_and_browser(home, page):
    out = home.parent / "pngs"
    result = run_main("report", "pair", "-o", str(home.parent / "pair.html"), "--png", str(out), "--cost", "train_flops",
                     env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    text = (home.parent / "pair.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert not re.search(r"<script[^>]*\ssrc=", text), "the report must not load scripts from elsewhere"
    assert text.count("plotly.js v") == 1, "plotly.js is inlined exactly once"
    assert "Pareto front" in text and 'id="trial-filter"' in text
    assert "Not shown" not in text  # both AlexNets completed, so the comparison is there
    assert re.search(r"the 28-px variant takes [0-9.]+× the seconds per epoch", text)
    assert "alexnet (65 px)" in text and "alexnet_28 (28 px)" in text  # the cpu preset runs AlexNet at its minimum
    assert "<h2>AlexNet at 65 px against the 28-px variant</h2>" in text and "224 px" not in text  # the sizes that trained

    # Every figure also as a PNG.
    expected = {"cost", "cost-model", "alexnet-0", "curves", "history", "importance", "parallel-0", "slice-0", "layers-0"}
    assert {p.stem for p in out.glob("*.png")} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC

    errors = _watch(page)
    page.goto((home.parent / "pair.html").as_uri())
    plots = _plots_drawn(page)
    assert {f"plot-{name}" for name in expected} == set(plots)
    # The cost axis opens on --cost; its buttons switch it in the page.
    title = "document.getElementById('plot-cost').layout.xaxis.title.text"
    assert "FLOPs" in page.evaluate(title)
    page.locator("#plot-cost .updatemenu-button", has_text="peak memory").click()
    page.wait_for_function(f"{title}.startsWith('peak resident memory added per trial, CPU')")  # what the CPU measured
    # Clicking the trial header sorts ascending, clicking again descending.
    numbers = lambda: [int(n) for n in page.locator("#trials tbody tr:visible td:nth-child(2)").all_inner_texts()]
    page.click("#trials th:nth-child(2)")
    assert numbers() == [0, 1, 2, 3, 4]
    page.click("#trials th:nth-child(2)")
    assert numbers() == [4, 3, 2, 1, 0]
    page.screenshot(path=str(ARTIFACTS / "report-full.png"), full_page=True)
    # The filter keeps rows that hold every word typed (every trial is enqueued, so each state is certain).
    page.fill("#trial-filter", "fail diverged")
    assert numbers() == [1]
    assert page.inner_text("#trial-count") == "1 of 5 trials"
    page.fill("#trial-filter", "")
    assert len(numbers()) == 5
    assert errors == []


@pytest.mark.slow  # the `home` fixture, as above
def test_two_studies_on_the_same_axes(home, page):
    result = run_main("report", "pair", "tiny", "-o", str(home.parent / "both.html"), env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    errors = _watch(page)
    page.goto((home.parent / "both.html").as_uri())
    _plots_drawn(page)
    names = page.evaluate("document.getElementById('plot-cost').data.map(trace => trace.name)")
    assert {"alexnet (pair)", "alexnet_28 (pair)", "vgg11 (tiny)", "Pareto front (pair)", "Pareto front (tiny)"} <= set(names)
    assert page.locator("#summary tbody tr").count() == 2
    assert page.locator("#trials tbody tr").count() == 8
    page.screenshot(path=str(ARTIFACTS / "report-two-studies.png"), full_page=True)
    assert errors == []


def _trial(state, arch, lr, values=None, epochs=None):
    """A finished trial as the launcher records it, for studies that training cannot produce cheaply."""
    attrs = {"config": {"arch": arch, "resize": 28, "lr": lr, "ratio": 1, "epochs": len(epochs or [1])}}
    if state != TrialState.FAIL:
        seconds = 2.0 + 10 * lr
        attrs |= {"test_accuracy": 0.5, "train_seconds": seconds, "wall_seconds": seconds + 1, "train_flops": 1e9 * seconds,
                  "peak_memory_bytes": 2**28, "flops_per_example": 2.9e5, "param_count": 61706, "epochs_run": len(epochs or [1]), "device": "cpu"}
    else:
        attrs["fail_reason"] = "diverged: training loss became nan in epoch 1"
    return create_trial(state=state, values=values, params={"arch": arch, "lr": lr}, user_attrs=attrs,
                        distributions={"arch": CategoricalDistribution(["lenet", "lenet_bn"]), "lr": FloatDistribution(0.01, 1.0, log=True)},
                        intermediate_values=dict(enumerate(epochs or [], start=1)))


@pytest.fixture
def storage(study_home):
    study_home.mkdir(parents=True)
    return journal(study_home)


def test_edge_cases_render(storage, study_home, page, capsys):
    # No finished trial: one still running.
    optuna.create_study(study_name="running", storage=storage).ask()
    # Only failed trials.
    failed = optuna.create_study(study_name="failed", storage=storage, direction="maximize")
    for lr in (0.5, 0.9):
        failed.add_trial(_trial(TrialState.FAIL, "lenet", lr))
    # Two objectives, as a cost-aware launch records them: maximise accuracy, minimise training seconds.
    multi = optuna.create_study(study_name="multi", storage=storage, directions=["maximize", "minimize"])
    multi.set_metric_names(["val_accuracy", "train_seconds"])
    for arch, lr, accuracy in (("lenet", 0.1, 0.71), ("lenet_bn", 0.5, 0.83), ("lenet", 0.9, 0.78)):
        multi.add_trial(_trial(TrialState.COMPLETE, arch, lr, values=[accuracy, 2.0 + 10 * lr], epochs=[accuracy - 0.2, accuracy]))
    multi.add_trial(_trial(TrialState.PRUNED, "lenet_bn", 0.02, epochs=[0.3]))  # Optuna keeps no values for it

    for name in ("running", "failed", "multi"):
        path = study_home / f"{name}.html"
        assert main(["report", name, "-o", str(path)]) == 0, capsys.readouterr().err
        text = path.read_text()
        for section in SECTIONS:
            # No study here holds both AlexNets, so the comparison is left out rather than drawn empty.
            assert (f'<section id="{section}">' in text) == (section != "alexnet")
        errors = _watch(page)
        page.goto(path.as_uri())
        plots = _plots_drawn(page)
        assert errors == [], name
        if name == "multi":
            assert {"plot-cost", "plot-curves", "plot-history", "plot-importance", "plot-parallel-0", "plot-slice-0", "plot-layers-0"} <= set(plots)
            assert "max val_accuracy, min train_seconds" in text
            # The pruned trial's accuracy is its last report, faded with the pruned trials.
            assert page.evaluate("document.getElementById('plot-cost').data.some(t => t.y.includes(0.3))")
            page.screenshot(path=str(ARTIFACTS / "report-multi-objective.png"), full_page=True)
        else:
            assert plots == [], name
            assert "No complete or pruned trial yet" in text
    assert "1 RUNNING" in (study_home / "running.html").read_text()
    assert "2 FAIL" in (study_home / "failed.html").read_text()


def test_report_mistakes_are_one_line(storage, study_home, tmp_path, capsys, monkeypatch):
    optuna.create_study(study_name="exists", storage=storage)
    out = tmp_path / "x.html"
    (tmp_path / "afile").write_text("a file, not a directory")
    cases = [(["report", "nosuch", "-o", str(out)], "error: no study named 'nosuch'"),
             (["report", "exists", "nosuch", "-o", str(out)], "error: no study named 'nosuch'"),
             (["report", "exists", "-o", str(tmp_path / "x.png")], "error: -o"),
             (["report", "exists", "-o", str(out), "--png", str(tmp_path / "afile")], "error: --png")]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    assert main(["report", "exists", "-o", str(tmp_path / "y.html"), "--png", str(tmp_path / "pngs")]) == 1
    assert capsys.readouterr().err.startswith("error: --png needs Chromium")
    assert not (tmp_path / "y.html").exists() and not (tmp_path / "pngs").exists()
    # A study name that does not exist, as a user types it.
    result = run_main("report", "nosuch", env={"STUDY_HOME": str(study_home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 1 and result.stderr.startswith("error: no study named 'nosuch'") and result.stderr.count("\n") == 1


def test_write_report_rejects_an_unknown_cost_axis(tmp_path):
    with pytest.raises(ValueError, match="cost axis 'seconds'"):
        write_report([], tmp_path / "r.html", cost="seconds")


# Two accuracy,cost studies, one per cost; their trials keep their per-epoch accuracy as a user attribute (records.VAL_CURVE),
# not as Optuna intermediate values, and their cost objective is also a recorded result of the same name.
COSTS = {"seconds": "train_seconds", "flops": "train_flops"}


@pytest.fixture(scope="module")
def cost_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cost") / "home"
    for name, cost in COSTS.items():
        spec = make_spec(home.parent, name, LENET, fixed={"epochs": 2})
        result = run_main("launch", str(spec), "--trials", "2", "--objective", "accuracy,cost", "--cost", cost, "--log-model", "none",
                          env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": None})
        assert result.returncode == 0, result.stderr
    return home


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_of_accuracy_cost_studies_has_one_column_per_name(cost_home, tmp_path, suffix):
    for name, cost in COSTS.items():
        path = tmp_path / f"{name}{suffix}"
        result = run_main("export", name, "-o", str(path), env={"STUDY_HOME": str(cost_home), "MLFLOW_TRACKING_URI": None})
        assert result.returncode == 0, result.stderr
        columns = (pyarrow.csv.read_csv(path) if suffix == ".csv" else pyarrow.parquet.read_table(path)).column_names
        assert len(columns) == len(set(columns)), sorted(c for c in columns if columns.count(c) > 1)
        frame = (pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)).sort_values("number")
        assert list(frame.columns) == columns  # pandas renames a repeated name (train_seconds.1): none here
        trials = optuna.load_study(study_name=name, storage=journal(cost_home)).get_trials()
        assert frame["val_accuracy"].tolist() == pytest.approx([t.values[0] for t in trials])
        assert frame[cost].tolist() == pytest.approx([t.values[1] for t in trials])
        assert frame["mlflow.status"].tolist() == ["FINISHED"] * len(trials)


def test_report_draws_the_curve_of_every_accuracy_cost_trial(cost_home, tmp_path, page):
    path = tmp_path / "cost.html"
    result = run_main("report", *COSTS, "-o", str(path), env={"STUDY_HOME": str(cost_home), "MLFLOW_TRACKING_URI": None})
    assert result.returncode == 0, result.stderr
    errors = _watch(page)
    page.goto(path.as_uri())
    assert "plot-curves" in _plots_drawn(page)
    # The validation-accuracy panel (x axis "x"): one trace per trial, one point per epoch it ran.
    drawn = page.evaluate("document.getElementById('plot-curves').data.filter(t => (t.xaxis || 'x') === 'x')"
                          ".map(t => [t.meta.study, t.meta.trial, t.x.length])")
    expected = [[name, trial.number, trial.user_attrs["epochs_run"]] for name in COSTS
                for trial in optuna.load_study(study_name=name, storage=journal(cost_home)).get_trials()]
    assert sorted(drawn) == sorted(expected) and all(epochs == 2 for _, _, epochs in expected)
    assert errors == []


def test_a_front_of_one_trial_is_drawn_and_the_cost_model_axes_say_their_units(storage):
    from dashboards.decisions import cost_model_figure
    from dashboards.figures import cost_figure
    from dashboards.report import trials_frame

    study = optuna.create_study(study_name="single", storage=storage, direction="maximize")
    trial = _trial(TrialState.COMPLETE, "lenet", 0.1, values=[0.8], epochs=[0.7, 0.8])
    trial.user_attrs.update({"predicted_flops": 2.5e9, "predicted_seconds": 2.0})
    study.add_trial(trial)
    frame = trials_frame([study]).assign(run_url="")
    [front] = [trace for trace in cost_figure(frame).data if trace.name == "Pareto front"]
    assert len(front.x) == 1 and "markers" in front.mode  # a line of one point draws nothing, nor in the legend
    layout = cost_model_figure(frame).layout
    assert (layout.xaxis.title.text, layout.yaxis.title.text) == ("predicted training FLOPs", "measured training FLOPs")
    assert (layout.xaxis2.title.text, layout.yaxis2.title.text) == ("predicted seconds (wall)", "measured seconds (wall)")


def test_the_trial_table_scrolls_within_the_screen(storage, study_home, page, capsys):
    wide = optuna.create_study(study_name="wide", storage=storage, direction="maximize")
    for number in range(60):
        wide.add_trial(_trial(TrialState.COMPLETE, "lenet", 0.01 + number / 100, values=[0.5 + number / 200], epochs=[0.4, 0.5]))
    path = study_home / "wide.html"
    assert main(["report", "wide", "-o", str(path)]) == 0, capsys.readouterr().err
    page.goto(path.as_uri())
    box = page.locator("#trials").locator("xpath=..")
    box.scroll_into_view_if_needed()
    # Wider and longer than the screen: its box fits the screen and scrolls, so its right-hand columns can be reached.
    size = box.evaluate("b => ({bottom: b.getBoundingClientRect().bottom, top: b.getBoundingClientRect().top, "
                        "scrollWidth: b.scrollWidth, clientWidth: b.clientWidth})")
    assert size["bottom"] - size["top"] <= page.viewport_size["height"], size
    assert size["scrollWidth"] > size["clientWidth"], size
    box.evaluate("b => { b.scrollLeft = b.scrollWidth; b.scrollTop = b.scrollHeight; }")
    last = page.locator("#trials th").last
    assert last.inner_text() == "MLflow" and last.is_visible()
    edge = box.evaluate("b => b.getBoundingClientRect().right")
    assert last.evaluate("th => th.getBoundingClientRect().right") <= edge + 1
    page.screenshot(path=str(ARTIFACTS / "report-wide-table.png"))
