"""The MLflow UI and the HTML report, opened in a real headless Chromium against a real sweep's store.

Skips (with the reason) where chromium, chromium-driver or selenium is missing; .ci/run installs them.
"""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import browser
from conftest import EXPERIMENT
from sweep import report
from sweep.tracking.ui import serve, share_view

WHY = browser.missing()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no headless browser: {WHY}")


def _first_sweep(tmp):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'sweep'",
                                 order_by=["attributes.start_time ASC"], max_results=1)
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, exp.experiment_id, parent, children


def test_mlflow_ui_shows_the_sweep_as_one_parent_with_its_children_and_metrics(store, tmp_path):
    tmp, _ = store
    client, exp_id, parent, children = _first_sweep(tmp)
    assert len(children) == 3
    path = share_view(client, exp_id, parent.data.tags["sweep.id"])
    with serve(f"sqlite:///{tmp}/mlflow.db", log_file=tmp_path / "server.log") as url:
        driver = browser.start()
        try:
            shown = browser.open_sweep_view(driver, url + path, parent.info.run_id,
                                            [c.info.run_id for c in children], "wikitext.word_perplexity")
            page = driver.page_source
        finally:
            driver.quit()
    assert EXPERIMENT in page and parent.info.run_name in page
    for child in children:  # each child's perplexity as the UI prints it (JavaScript's shortest repr, like Python's)
        value = child.data.metrics["wikitext.word_perplexity"]
        assert shown[child.info.run_id][:6] == repr(value)[:6], (shown, value)
        assert child.info.run_name in page


def test_html_report_opens_and_its_figures_render(store, tmp_path):
    tmp, _ = store
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
                        "--sweep-id", _first_sweep(tmp)[2].info.run_id, "--out", str(tmp_path), "--no-log"]) == 0
    page = next(tmp_path.glob("sweep-*.html"))
    driver = browser.start(1400, 2400)
    try:
        figures = browser.open_report(driver, page)
        text = driver.find_element("tag name", "body").text
    finally:
        driver.quit()
    assert set(figures) == {"WikiText-2 perplexity vs bits", "Quality vs weight memory", "Tokens/s vs memory"}
    assert all(width > 300 for width in figures.values()), figures
    assert "simulated" in text and "unquantized" in text and "Pareto front" in text
