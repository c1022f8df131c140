"""Real-browser tests: the layout designer inside JupyterLab, and the report page, in headless Chromium (Debian's
package, driven by Playwright with ``executable_path``; Playwright's own browser download does not work offline).
Screenshots are kept in ``output/test-artifacts/``."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = PROJECT_ROOT / "output" / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _serve_designer(tmp_path, command: list[str], port: int, url: str):
    """A Jupyter server on localhost serving a copy of notebook 02 (autosave must never touch the real notebook)."""
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / "02_layout_designer.ipynb", root)
    output_dir = tmp_path / "out"
    env = {**os.environ, "HELPERS_OUTPUT_DIR": str(output_dir), "HELPERS_PROFILE": "tiny"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([*command, f"--port={port}", "--ip=127.0.0.1", "--no-browser", "--allow-root"],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"the Jupyter server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, output_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab with ipywidgets 8 (the project's own environment)."""
    if _installed("jupyterlab") is None:
        pytest.skip("JupyterLab is not installed here (the Colab-pins environment tests the classic notebook)")
    port, token = _free_port(), secrets.token_hex(8)
    yield from _serve_designer(tmp_path, [sys.executable, "-m", "jupyterlab", f"--IdentityProvider.token={token}"],
                               port, f"http://127.0.0.1:{port}/lab/tree/02_layout_designer.ipynb?token={token}")


@pytest.fixture
def classic_notebook(tmp_path):
    """The classic notebook 6.5 with ipywidgets 7.7 (Colab's versions; Colab's front end is closest to it)."""
    version = _installed("notebook") or ""
    if not version.startswith("6.") or not (_installed("ipywidgets") or "").startswith("7."):
        pytest.skip(f"needs notebook 6.x and ipywidgets 7.x (Colab's), found notebook {version or 'none'}: "
                    f"`make test-colab` runs this in an environment with Colab's pins")
    port, token = _free_port(), secrets.token_hex(8)
    yield from _serve_designer(tmp_path, [sys.executable, "-m", "notebook", f"--NotebookApp.token={token}"],
                               port, f"http://127.0.0.1:{port}/notebooks/02_layout_designer.ipynb?token={token}")


def test_designer_renders_and_a_moved_control_changes_preview_and_saved_json(browser, jupyterlab):
    url, output_dir = jupyterlab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector(".jp-NotebookPanel", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=90_000)
    time.sleep(3)  # let the kernel come up before asking it to run
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item:has-text('Run All Cells')")
    _move_first_slider_and_save(page, output_dir, "designer.png")


def test_designer_on_colabs_widgets_in_the_classic_notebook(browser, classic_notebook):
    url, output_dir = classic_notebook
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    # widgetsnbextension attaches its manager to the kernel once it has registered the widget comm target; cells
    # run before that display nothing
    page.wait_for_function("() => window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel "
                           "&& Jupyter.notebook.kernel.is_connected() && Jupyter.notebook.kernel.widget_manager",
                           timeout=90_000)
    time.sleep(3)
    page.evaluate("() => Jupyter.notebook.execute_all_cells()")
    try:
        _move_first_slider_and_save(page, output_dir, "designer_classic_ipywidgets7.png")
    finally:
        page.screenshot(path=str(ARTIFACTS / "designer_classic_page.png"), full_page=True)
    assert not [e for e in errors if "widget" in e.lower()], errors
    assert "Click to show javascript error" not in page.inner_text("body")


def _move_first_slider_and_save(page, output_dir: Path, screenshot: str) -> None:
    designer = page.wait_for_selector(".layout-designer", timeout=180_000)
    layout_path = output_dir / "layout.json"
    for _ in range(120):  # the cell after the designer saves the untouched layout
        if layout_path.exists():
            break
        time.sleep(0.5)
    before = json.loads(layout_path.read_text())
    preview = designer.query_selector("img")
    src_before = preview.get_attribute("src")
    assert "layout is valid" in designer.inner_text()

    readout = designer.query_selector_all(".widget-readout")[0]  # the first subject's x
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("0.12")
    page.keyboard.press("Enter")
    page.wait_for_function("([img, src]) => img.getAttribute('src') !== src", arg=[preview, src_before],
                           timeout=30_000)
    designer.query_selector("button:has-text('Save layout')").click()
    page.wait_for_selector(".layout-designer :text('saved layout.json')", timeout=30_000)
    after = json.loads(layout_path.read_text())
    designer.screenshot(path=str(ARTIFACTS / screenshot))
    first = before["regions"][0]["subject"]
    assert after["regions"][0]["subject"] == first
    assert after["regions"][0]["x"] == pytest.approx(0.12) != before["regions"][0]["x"]
    assert after["regions"][1] == before["regions"][1]


def _series_report(tmp_path_factory) -> Path:
    """The report of a real tiny series: the one the nbval run just wrote, else run the series now."""
    written = Path(os.environ.get("HELPERS_OUTPUT_DIR", "")) / "report" / "index.html"
    if written.is_file():
        return written
    from helpers.run import run_series

    out = tmp_path_factory.mktemp("series")
    _, code = run_series(output_dir=str(out), profile="tiny", progress=False)
    assert code == 0
    return out / "report" / "index.html"


def test_report_opens_offline_and_every_image_loads(browser, tmp_path_factory):
    report = _series_report(tmp_path_factory)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    failed = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    images = page.query_selector_all("img")
    assert len(images) >= 5
    for image in images:
        src = image.get_attribute("src")
        assert (report.parent / src).is_file(), src
        assert image.evaluate("img => img.complete && img.naturalWidth > 0"), src
    assert not failed
    assert "RANDOM WEIGHTS" in page.inner_text("#profile-banner")
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
