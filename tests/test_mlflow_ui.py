"""The MLflow UI as a user first sees it, in a browser profile that has never opened it (a new context per test):
every address `study ui` prints and the report writes opens MLflow's model-training view, and the home page, which
no address of ours reaches, takes the one click the README names. MLflow 3 picks the view by the address's
`workflowType`, else by the choice its sidebar stored in the browser, else GenAI (study/tracking.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ARTIFACTS, LENET, ROOT, free_port, make_spec, run_cli, wait_until_up

pytestmark = pytest.mark.slow  # a real MLflow UI server behind `study ui`

STUDY, MODEL = "lenet_ui", "lenet-ui-best"
WAIT_MS = 90_000  # the UI's first page load compiles its bundle; generous, never a measure of speed


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A LeNet study launched with its best model registered, and `study ui` serving it: (base address, the
    lines `study ui` printed, the study home)."""
    home = tmp_path_factory.mktemp("mlflow_ui") / "home"
    spec = make_spec(home.parent, STUDY, LENET)
    launched = run_cli("launch", str(spec), "--trials", "2", "--register", MODEL, env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    assert launched.returncode == 0, launched.stderr
    port = free_port()
    env = {**os.environ, "STUDY_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = home.parent / "ui.log"
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, "-m", "study", "ui", "--port", str(port)], cwd=ROOT, env=env, stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server, "MLflow UI", log=log.read_text)
        yield f"http://127.0.0.1:{port}", log.read_text().splitlines(), home
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def printed_links(lines: list[str]) -> dict[str, str]:
    """`study ui`'s indented `what: link` lines."""
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  ") and ": http" in line)


def assert_model_training_view(page) -> None:
    """MLflow's model-training view: its sidebar links the model registry and none of the GenAI pages, and no
    GenAI prompt ("Detect Issues") is on the page."""
    sidebar = page.locator("aside")
    sidebar.get_by_role("link", name="Model registry").first.wait_for(timeout=WAIT_MS)
    for genai in ("AI Gateway", "Prompts", "Judges", "Playground"):
        assert sidebar.get_by_role("link", name=genai).count() == 0, f"the GenAI sidebar's {genai!r} is shown"
    assert page.get_by_text("Detect Issues").count() == 0


def assert_genai_view(page) -> None:
    sidebar = page.locator("aside")
    sidebar.get_by_role("link", name="AI Gateway").first.wait_for(timeout=WAIT_MS)
    assert sidebar.get_by_role("link", name="Model registry").count() == 0


def test_ui_prints_every_address_in_the_model_training_view(ui):
    base, lines, _ = ui
    links = printed_links(lines)
    assert set(links) == {STUDY, f"model {MODEL} v1"}, lines
    assert all(link.startswith(f"{base}/#/") and "workflowType=machine_learning" in link for link in links.values()), links
    assert any('"Model training"' in line for line in lines), lines  # the one click for every other page


def test_home_page_takes_one_click_then_the_browser_keeps_model_training(ui, page):
    """The bare address `study ui` prints opens MLflow's home page in its GenAI view (MLflow has no server-side
    default); one click on "Model training" stores the choice, and the study clicked from there opens its runs."""
    base, _, _ = ui
    page.goto(base)
    assert_genai_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-home-genai.png"))
    page.locator("aside").get_by_role("button", name="Model training").click()
    assert_model_training_view(page)
    page.get_by_role("link", name=STUDY, exact=True).first.click()
    page.wait_for_url(re.compile(r"/#/experiments/\d+/runs\?.*workflowType=machine_learning"), timeout=WAIT_MS)
    page.get_by_role("gridcell", name=STUDY).first.wait_for(timeout=WAIT_MS)  # the study's parent run in the runs table
    assert_model_training_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-study-from-home.png"))
    again = page.context.new_page()  # the same browser, later: the home page now opens in model training
    again.goto(base)
    assert_model_training_view(again)


def test_study_link_opens_its_runs_in_model_training(ui, page):
    _, lines, _ = ui
    page.goto(printed_links(lines)[STUDY])
    page.get_by_role("link", name="trial-0", exact=True).first.wait_for(timeout=WAIT_MS)
    assert re.search(r"/#/experiments/\d+/runs\?", page.url), page.url  # the runs, not the GenAI overview
    assert_model_training_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-study-link.png"))


def test_report_run_link_opens_the_trial_in_model_training(ui, page):
    """The report's link to a trial's run (written for the UI at `study ui`'s default address) opens the run page
    with the model-training sidebar."""
    base, _, home = ui
    report = (home / "reports" / f"{STUDY}.html").read_text()
    links = re.findall(r'href="http://127\.0\.0\.1:5000(/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning)"', report)
    assert links, "the report links no run in the model-training view"
    page.goto(base + links[0])
    page.get_by_text("Optuna state").first.wait_for(timeout=WAIT_MS)  # the trial's run description
    assert_model_training_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-trial-run.png"))


def test_model_version_link_opens_in_model_training(ui, page):
    _, lines, _ = ui
    page.goto(printed_links(lines)[f"model {MODEL} v1"])
    page.get_by_text("Version 1").first.wait_for(timeout=WAIT_MS)
    page.get_by_text(f"Optuna study {STUDY}").first.wait_for(timeout=WAIT_MS)  # the version's description
    assert_model_training_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-model-version.png"))
