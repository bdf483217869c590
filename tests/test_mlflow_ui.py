"""The MLflow UI as a user first sees it, in a browser profile that has never opened it (a new context per test):
every address `study ui` prints and the report writes, and the bare home page, opens MLflow's model-training view,
and every page clicked from there stays in it. MLflow 3 picks the view by the address's `workflowType`, else by the
choice its sidebar stored in the browser, else GenAI; `study ui` serves MLflow's app of study/mlflow_app.py, which
stores the model-training choice in a browser that has none, and keeps a choice the user made.

One `study ui` serves every test here, in the order written; the last stops it with SIGTERM and checks that its
server went with it, that it printed no third-party warning and that it changed no file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from reliability.checks import changed, fingerprint, record_read_only

from conftest import ARTIFACTS, LENET, ROOT, free_port, listening_addresses, make_spec, run_cli, wait_until_up
from study.mlflow_app import WORKFLOW_KEY

pytestmark = pytest.mark.slow  # a real MLflow UI server behind `study ui`

STUDY, MODEL = "lenet_ui", "lenet-ui-best"
TRIALS = ["trial-0", "trial-1", "trial-2"]
WAIT_MS = 90_000  # the UI's first page load compiles its bundle; generous, never a measure of speed


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A LeNet study of three trials launched with its best model registered, and `study ui` serving it from a
    fresh interpreter, as a user starts it: a dict of its base address, port, process, the lines it printed, its
    standard error, the study home and the fingerprint of the home and working directory before it started."""
    root = tmp_path_factory.mktemp("mlflow_ui")
    home, workdir = root / "home", root / "workdir"
    workdir.mkdir()
    spec = make_spec(root, STUDY, LENET)
    launched = run_cli("launch", str(spec), "--trials", "3", "--register", MODEL, env={"STUDY_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    assert launched.returncode == 0, launched.stderr
    before = fingerprint(home, workdir)
    port = free_port()
    env = {**os.environ, "STUDY_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    base = f"http://127.0.0.1:{port}"
    out, err = root / "ui.out", root / "ui.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "study", "ui", "--port", str(port)], cwd=workdir, env=env, stdout=stdout, stderr=stderr)
    try:
        # The moment its links appear, the server they name answers (asked once, at once).
        deadline = time.monotonic() + 180  # a guard against a hang, not a speed limit
        while f"#mlflow={base}\n" not in out.read_text():  # the report's line, the last `ui` prints
            assert server.poll() is None and time.monotonic() < deadline, out.read_text() + err.read_text()
            time.sleep(0.02)
        with urllib.request.urlopen(f"{base}/health", timeout=30) as answer:
            answered_when_printed = answer.status == 200
        wait_until_up(f"{base}/health", server, "MLflow UI", log=lambda: out.read_text() + err.read_text())
        yield {"base": base, "port": port, "process": server, "lines": out.read_text().splitlines(), "stderr": err.read_text,
               "home": home, "workdir": workdir, "before": before, "answered_when_printed": answered_when_printed}
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # `ui` stops its server's whole process group
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
    base, lines = ui["base"], ui["lines"]
    assert ui["answered_when_printed"]  # printed only once the server answers: the first click is not refused
    links = printed_links(lines)
    assert set(links) == {STUDY, f"model {MODEL} v1"}, lines
    assert all(link.startswith(f"{base}/#/") and "workflowType=machine_learning" in link for link in links.values()), links
    assert not any("Model training" in line for line in lines), lines  # no click to ask for: every page opens in it


def registered_trial(base: str) -> str:
    """The name of the trial whose model is version 1 of MODEL, from the server's REST API."""
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/model-versions/get?name={MODEL}&version=1") as response:
        run_id = json.load(response)["model_version"]["run_id"]
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as response:
        return {t["key"]: t["value"] for t in json.load(response)["run"]["data"]["tags"]}["mlflow.runName"]


@pytest.mark.parametrize("start", ["study link", "home page", "model link"])
def test_every_click_stays_in_model_training(ui, page, start):
    """From each address `ui` prints and from the bare home page, in a new browser profile: the study, the trial whose
    model is registered, its model metrics, back, and that model's version page, each in the model-training view (the
    addresses MLflow's own links lead to carry no `workflowType`)."""
    base, links, trial = ui["base"], printed_links(ui["lines"]), registered_trial(ui["base"])
    shots = iter(range(1, 10))

    def arrived(step: str) -> None:
        assert_model_training_view(page)
        page.screenshot(path=str(ARTIFACTS / f"mlflow-ui-path-{start.replace(' ', '-')}-{next(shots)}-{step}.png"))

    if start == "model link":
        page.goto(links[f"model {MODEL} v1"])
        page.get_by_text("Version 1").first.wait_for(timeout=WAIT_MS)
        page.get_by_text(f"Optuna study {STUDY}").first.wait_for(timeout=WAIT_MS)  # the version's description
        arrived("model-version")
        page.get_by_role("link", name=trial, exact=True).first.click()  # the version's source run
    else:
        if start == "home page":
            page.goto(base)
            page.get_by_role("link", name=STUDY, exact=True).first.wait_for(timeout=WAIT_MS)  # the home page's recent experiments
            arrived("home")
            page.get_by_role("link", name=STUDY, exact=True).first.click()
            parent = page.locator("[role=gridcell]", has_text=STUDY).first  # ordered by start time: the trials fold under it
            parent.wait_for(timeout=WAIT_MS)
            parent.locator("button").first.click()
        else:
            page.goto(links[STUDY])
        page.get_by_role("link", name=trial, exact=True).first.wait_for(timeout=WAIT_MS)
        arrived("study")
        page.get_by_role("link", name=trial, exact=True).first.click()
    page.wait_for_url(re.compile(r"/#/experiments/\d+/runs/[0-9a-f]{32}$"), timeout=WAIT_MS)
    page.get_by_text("Optuna state").first.wait_for(timeout=WAIT_MS)  # the trial's run description
    arrived("trial")
    page.get_by_role("tab", name="Model metrics").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f]{32}/model-metrics$"), timeout=WAIT_MS)
    arrived("model-metrics")
    page.go_back()
    page.get_by_text("Optuna state").first.wait_for(timeout=WAIT_MS)
    arrived("back")
    page.locator(f'a[href$="#/models/{MODEL}/versions/1"]').first.click()  # the run's registered model version
    page.wait_for_url(re.compile(rf"/#/models/{MODEL}/versions/1$"), timeout=WAIT_MS)
    page.get_by_text(f"Optuna study {STUDY}").first.wait_for(timeout=WAIT_MS)  # the version's description
    arrived("model-version")


def test_a_choice_of_genai_is_kept(ui, page):
    """The model-training view is only the default: a click on "GenAI" in the sidebar's switch stays this browser's
    choice, for the home page opened again, and "Model training" switches back."""
    base = ui["base"]
    page.goto(base)
    assert_model_training_view(page)
    assert page.evaluate(f"localStorage.getItem('{WORKFLOW_KEY}')") == '"machine_learning"'
    page.locator("aside").get_by_role("button", name="GenAI").click()
    assert_genai_view(page)
    again = page.context.new_page()  # the same browser, later
    again.goto(base)
    assert_genai_view(again)
    again.screenshot(path=str(ARTIFACTS / "mlflow-ui-home-genai-chosen.png"))
    again.locator("aside").get_by_role("button", name="Model training").click()
    assert_model_training_view(again)
    third = page.context.new_page()
    third.goto(base)
    assert_model_training_view(third)


def test_study_link_opens_its_trials_and_curves_in_model_training(ui, page):
    """The study's link: its runs in the model-training view, trials listed flat, per-epoch curves first."""
    page.goto(printed_links(ui["lines"])[STUDY])
    for name in TRIALS:  # flat, not folded under the parent run
        page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=WAIT_MS)
    assert re.search(r"/#/experiments/\d+/runs\?", page.url), page.url  # the runs, not the GenAI overview
    assert_model_training_view(page)
    page.get_by_text("Per-epoch curves").first.wait_for(timeout=WAIT_MS)
    # The first chart section holds the per-epoch curves; the other metrics follow in "Model metrics".
    sections = page.evaluate("""Array.from(document.querySelectorAll('*')).filter(e => e.children.length === 0)
                                .map(e => e.textContent.trim()).filter(t => /^(Per-epoch curves|Model metrics)/.test(t))""")
    assert sections and sections[0].startswith("Per-epoch curves"), sections
    close = page.get_by_role("button", name="Close")  # MLflow's assistant panel, which opens itself on a first visit
    if close.count():
        close.first.click()
    page.wait_for_timeout(2000)  # the charts draw after their data arrives
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-first-view.png"), full_page=True)


def test_ui_listens_on_this_machine_only_and_nests_the_trials(ui, page):
    """By default the UI is reachable from this machine only; its runs table shows the parent run (named after the
    study), whose expander reveals the trials."""
    base = ui["base"]
    assert listening_addresses(ui["port"]) == {"127.0.0.1"}
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={STUDY}") as response:
        experiment_id = json.load(response)["experiment"]["experiment_id"]
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        runs = json.load(response)["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parent = [run["info"]["run_id"] for run, t in zip(runs, tags) if t.get("study.role") == "parent"]
    assert len(parent) == 1
    assert sorted(t["mlflow.runName"] for t in tags if t.get("mlflow.parentRunId") == parent[0]) == TRIALS

    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    parent_cell = page.locator("[role=gridcell]", has_text=STUDY).first
    parent_cell.wait_for(timeout=WAIT_MS)
    parent_cell.locator("button").first.click()
    for name in TRIALS:
        page.locator("[role=gridcell]", has_text=name).first.wait_for(timeout=WAIT_MS)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui.png"), full_page=True)


def test_report_run_link_opens_the_trial_in_model_training(ui, page):
    """The report's link to a trial's run, from the report's address `study ui` prints, opens the run page of that UI
    (on the port it serves, not the default it was written for) with the model-training sidebar."""
    base, home = ui["base"], ui["home"]
    report = (home / "reports" / f"{STUDY}.html").read_text()
    assert re.search(r'href="http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning"', report), \
        "the report links no run in the model-training view"
    [address] = [line.split(": ", 1)[1] for line in ui["lines"] if line.startswith(f"  report {STUDY}: ")]
    assert address.startswith("file://") and address.endswith(f"#mlflow={base}"), address
    page.goto(address)
    link = page.locator("#trials a").first
    assert re.fullmatch(rf"{re.escape(base)}/#/experiments/\d+/runs/[0-9a-f]{{32}}\?workflowType=machine_learning", link.get_attribute("href"))
    link.click()
    page.wait_for_url(f"{base}/**", timeout=WAIT_MS)
    page.get_by_text("Optuna state").first.wait_for(timeout=WAIT_MS)  # the trial's run description
    assert_model_training_view(page)
    page.screenshot(path=str(ARTIFACTS / "mlflow-ui-trial-run.png"))


# --- last: stopping it ---------------------------------------------------------------------------------------

def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_server_and_nothing_was_written_or_warned(ui):
    """SIGTERM to `study ui` stops its server and the server's workers, and frees the port; after all the browsing
    above, no file of the study home or the working directory changed, and `ui` printed no third-party warning."""
    process = ui["process"]
    servers = _descendants(process.pid)
    assert len(servers) >= 2, servers  # mlflow ui and its uvicorn server at least
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 30  # the group got SIGTERM before `ui` exited; reaping by init may lag a moment
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in servers if _alive(pid)] == []
    assert listening_addresses(ui["port"]) == set()
    after = fingerprint(ui["home"], ui["workdir"])
    record_read_only(1, len(changed(ui["before"], after)))
    assert changed(ui["before"], after) == []
    assert [line for line in ui["stderr"]().splitlines() if "Warning" in line] == []
