"""Browser test: headless Chromium (Debian package) against the MLflow UI of a tiny-int4 run.

The experiment's runs table shows the parent run and, expanded, its stage child runs; the parent run's page
links the same child runs and the registered model; the registered model's page shows version 1 with the alias.
Screenshots stay in test-artifacts/browser/. `make install` (its browser-deps target) installs chromium and
chromium-driver; selenium comes with the dev extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

if importlib.util.find_spec("selenium") is not None:
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        ElementNotInteractableException,
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "test-artifacts" / "browser"
EXPERIMENT = "tiny-int4"
STAGES = {"quantize", "evaluate", "benchmark"}
MODEL = "tiny-llama-int4"
ALIAS = "production"
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'
WAIT_S = 90  # a React page on 2 busy cores, first load included

_missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
if importlib.util.find_spec("selenium") is None:
    _missing.append("the selenium package")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(bool(_missing), reason=f"browser test needs {', '.join(_missing)}: run `make install` (browser-deps)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False  # not listening yet


@contextlib.contextmanager
def mlflow_server(mlruns: Path, log: Path) -> Iterator[str]:
    """`mlflow server` on the run's store, in its own session so that its workers stop with it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{mlruns / 'mlflow.db'}",
        "--default-artifact-root", str(mlruns / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not healthy after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def visible_text(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver: webdriver.Chrome, what: str, condition: Callable[[webdriver.Chrome], object]) -> object:
    """Waits for a truthy condition; on timeout fails with the page's visible text and a failure screenshot."""
    transient = (
        NoSuchElementException,  # not rendered yet
        StaleElementReferenceException,  # re-rendered between finding and reading it
        ElementNotInteractableException,
        ElementClickInterceptedException,
    )
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.5, ignored_exceptions=transient)
    try:
        return wait.until(condition)
    except TimeoutException as exc:
        shot = SHOTS / f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')[:60]}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(
            f"timed out after {WAIT_S} s waiting for {what} at {driver.current_url} (screenshot {shot});"
            f" visible text:\n{visible_text(driver)}"
        ) from exc


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 600, f"{path} is {width}x{height}"
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes: a blank page?"


def test_mlflow_ui_shows_runs_and_registered_model(tiny_int4_workdir, browser):
    tiny_workdir = tiny_int4_workdir
    from mlflow.tracking import MlflowClient

    SHOTS.mkdir(parents=True, exist_ok=True)
    shots = [SHOTS / f"{name}.png" for name in ("experiment", "parent-run", "model")]
    for old in [*shots, *SHOTS.glob("failed-*.png")]:
        old.unlink(missing_ok=True)

    assert run_cli(tiny_workdir, "run", str(ROOT / "recipes" / "tiny-int4.yaml")) == 0

    # What the UI must show, from the store itself.
    mlruns = tiny_workdir["mlruns"]
    client = MlflowClient(tracking_uri=f"sqlite:///{mlruns / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} in {mlruns}"
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.run_name == EXPERIMENT
    assert set(children) == STAGES, f"child runs {sorted(children)}"
    assert int(client.get_model_version_by_alias(MODEL, ALIAS).version) == 1

    with mlflow_server(mlruns, tiny_workdir["tmp"] / "mlflow-server.log") as url:
        experiment_url = f"{url}/#/experiments/{experiment.experiment_id}"

        # Experiment page: the parent run, then its stage child runs once its row is expanded (run name links).
        browser.get(f"{experiment_url}/runs")
        parent_row = f'[row-id="{parent.info.run_id}"] {RUN_NAME_CELL}'
        wait_for(
            browser,
            f"parent run {EXPERIMENT!r} in the runs table",
            lambda d: d.find_element(By.CSS_SELECTOR, f"{parent_row} a").text == EXPERIMENT,
        )
        collapsed = [name for name, rid in children.items() if browser.find_elements(By.CSS_SELECTOR, f'[row-id="{rid}"]')]
        assert not collapsed, f"child runs {collapsed} shown before expanding the parent"

        def expand_parent(driver) -> bool:
            driver.find_element(By.CSS_SELECTOR, f"{parent_row} button").click()  # retried only if it raised
            return True

        wait_for(browser, "expand button of the parent run", expand_parent)

        def child_rows_shown(driver) -> bool:
            shown = {
                name: driver.find_elements(By.CSS_SELECTOR, f'[row-id="{rid}"] {RUN_NAME_CELL} a')
                for name, rid in children.items()
            }
            return all(cells and cells[0].is_displayed() and cells[0].text == name for name, cells in shown.items())

        wait_for(browser, f"child runs {sorted(STAGES)} under the parent run", child_rows_shown)
        text = visible_text(browser)
        for name in (EXPERIMENT, *sorted(STAGES)):
            assert name in text, f"{name!r} not visible on the experiment page:\n{text}"
        screenshot(browser, "experiment")

        # Parent run page: links to each child run and to the registered model version.
        browser.get(f"{experiment_url}/runs/{parent.info.run_id}")
        wait_for(browser, "child runs section of the parent run", lambda d: "Child runs" in visible_text(d))
        for name, run_id in children.items():
            shown = wait_for(
                browser,
                f"link to child run {name!r}",
                lambda d, rid=run_id: d.find_element(By.CSS_SELECTOR, f'a[href$="/runs/{rid}"]').text,
            )
            assert shown == name, f"child run {run_id} is shown as {shown!r}, expected {name!r}"
        shown = wait_for(
            browser,
            "link to the registered model",
            lambda d: d.find_element(By.CSS_SELECTOR, f'a[href$="/models/{MODEL}/versions/1"]').text,
        )
        assert shown.split() == [MODEL, "v1"], f"registered model shown as {shown!r}"
        screenshot(browser, "parent-run")

        # Registered model page: version 1 carries the alias, in the Aliases column.
        browser.get(f"{url}/#/models/{MODEL}")

        def version_row(driver) -> dict[str, str] | None:
            """The versions table's row of version 1, as column name -> visible text, once it is rendered."""
            cells = "[role=columnheader], [role=cell]"
            rows = [
                [c.text for c in r.find_elements(By.CSS_SELECTOR, cells)]
                for r in driver.find_elements(By.CSS_SELECTOR, "[role=row]")
            ]
            if not rows or not {"Version", "Aliases"} <= set(rows[0]):
                return None
            return next(
                (row for row in (dict(zip(rows[0], r, strict=False)) for r in rows[1:]) if row.get("Version") == "Version 1"),
                None,
            )

        row = wait_for(browser, f"version 1 of {MODEL!r}", version_row)
        assert row["Aliases"].split() == ["@", ALIAS], f"aliases of version 1: {row['Aliases']!r}\n{visible_text(browser)}"
        text = visible_text(browser)
        assert MODEL in text, f"{MODEL!r} not visible on the model page:\n{text}"
        screenshot(browser, "model")

    for path in shots:
        assert_png(path)


def test_the_link_a_run_prints_opens_the_runs_table(tmp_path, browser):
    """MLflow 3.17 opens an experiment on its GenAI overview unless the URL (or the sidebar switch the
    browser remembers) says machine learning; the experiment link llmopt prints lands on the runs table."""
    from llmopt.tracking import Tracker, experiment_url

    tracker = Tracker(tmp_path / "mlruns")
    experiment_id = tracker.experiment("linked")
    with tracker.run(experiment_id, "the-run", {}) as run_id:
        pass
    assert experiment_url("http://127.0.0.1:5000", experiment_id) in tracker.run_url_hint(run_id, experiment_id)

    with mlflow_server(tmp_path / "mlruns", tmp_path / "mlflow-server.log") as url:
        browser.get(experiment_url(url, experiment_id))
        wait_for(
            browser,
            "the run in the runs table",
            lambda d: d.find_element(By.CSS_SELECTOR, f'[row-id="{run_id}"] {RUN_NAME_CELL} a').text == "the-run",
        )
        assert f"/experiments/{experiment_id}/runs" in browser.current_url
        assert "/overview" not in browser.current_url
