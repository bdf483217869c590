"""The report in a real headless Chromium (Debian's, driven by Playwright); the MLflow UI's are in test_mlflow_ui.py."""

from __future__ import annotations

from conftest import ARTIFACTS


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
