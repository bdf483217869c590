"""The report and the MLflow UI in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import ARTIFACTS, ROOT, free_port, listening_addresses, wait_until_up


def test_report_renders_every_plot_and_sorts(tiny_study, page):
    errors = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route("http*://**", lambda route: (errors.append(f"network request {route.request.url}"), route.abort()))
    page.goto((tiny_study / "reports" / "tiny.html").as_uri())
    for plot in ("plot-cost", "plot-history", "plot-curves"):
        # calcdata: the points Plotly computed from the (binary-encoded) trace data and drew.
        page.wait_for_function(f"document.getElementById('{plot}') && document.getElementById('{plot}').calcdata !== undefined")
        points = page.evaluate(f"document.getElementById('{plot}').calcdata.filter(trace => trace.length > 0 && trace[0].x !== undefined).length")
        assert points > 0, f"{plot} has no trace with data"
        assert page.locator(f"#{plot} .main-svg").count() > 0, f"{plot} was not drawn"
    # Clicking the trial header sorts the table: descending on the second click.
    numbers = lambda: [int(n) for n in page.locator("#trials tbody tr td:nth-child(2)").all_inner_texts()]
    assert numbers() == [0, 1, 2]
    page.click("#trials th:nth-child(2)")
    page.click("#trials th:nth-child(2)")
    assert numbers() == [2, 1, 0]
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    assert errors == []


@pytest.mark.slow  # a real `mlflow server` behind `study ui`
def test_ui_serves_the_study_runs_nested(tiny_study, page):
    port = free_port()
    env = {**os.environ, "STUDY_HOME": str(tiny_study)}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([sys.executable, "-m", "study", "ui", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/health", server, "MLflow UI", log=server.stdout.read)
        assert listening_addresses(port) == {"127.0.0.1"}  # by default the UI is reachable from this machine only
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny") as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            runs = json.load(response)["runs"]
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        parent = [run["info"]["run_id"] for run, t in zip(runs, tags) if t.get("study.role") == "parent"]
        assert len(parent) == 1
        assert sorted(t["mlflow.runName"] for t in tags if t.get("mlflow.parentRunId") == parent[0]) == ["trial-0", "trial-1", "trial-2"]

        # The runs table shows the parent run (named after the study); its expander reveals the trials.
        page.goto(f"{base}/#/experiments/{experiment_id}/runs")
        parent_cell = page.locator("[role=gridcell]", has_text="tiny").first
        parent_cell.wait_for(timeout=60_000)
        parent_cell.locator("button").first.click()
        for name in ("trial-0", "trial-1", "trial-2"):
            page.locator("[role=gridcell]", has_text=name).first.wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui.png"), full_page=True)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
