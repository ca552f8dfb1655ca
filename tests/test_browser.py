"""The interactive lesson in a real browser: JupyterLab and headless Chromium run lesson 04 and drive its panel.

A learner's path, end to end: open the notebook, Run All Cells, then change the training panel's settings, press
Run, Stop, and type an impossible value. Needs Chromium and the ``playwright`` package (no Playwright browser
download); deselect with ``-m "not browser"``. Screenshots go to ``runs/browser-test/`` (or
``$GPT_HELPERS_BROWSER_ARTEFACTS``), with a full-page screenshot and the JupyterLab log when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import pytest

from gpt_helpers.course import LESSONS, NOTEBOOKS_DIR

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.browser

LESSON = next(lesson for lesson in LESSONS if lesson.notebook == "04_fine_tune.ipynb")
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GPT_HELPERS_CHROMIUM", "/usr/bin/chromium")
ARTEFACTS = Path(os.environ.get("GPT_HELPERS_BROWSER_ARTEFACTS", REPO / "runs" / "browser-test"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_SECONDS = 90
LESSON_SECONDS = 540  # lesson 04 with its CI parameters, one thread, beside the browser
PANEL_RUN_SECONDS = 180
MS = 1000  # Playwright timeouts are in milliseconds
VIEWPORT = {"width": 1440, "height": 1800}  # tall enough for the whole panel after a run (element screenshots)

#: Records what a learner sees of the panel at every DOM change: progress bar width (%), plot image (a hash),
#: whether Run and the steps field are disabled.
OBSERVE_PANEL_JS = """
(panel) => {
    const hash = (text) => {
        let h = 0;
        for (let i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) | 0;
        return h;
    };
    const snapshot = () => {
        const bar = panel.querySelector('.gh-progress .progress-bar');
        const img = panel.querySelector('.gh-plot img');
        const run = panel.querySelector('button.gh-run'), steps = panel.querySelector('.gh-steps input');
        return {progress: bar ? parseFloat(bar.style.width) || 0 : null, plot: img ? hash(img.src) : null,
                runDisabled: run ? run.disabled : null, stepsDisabled: steps ? steps.disabled : null};
    };
    if (window.ghObserver) window.ghObserver.disconnect();
    window.ghSnapshots = [snapshot()];
    window.ghObserver = new MutationObserver(() => {
        const now = snapshot(), last = window.ghSnapshots[window.ghSnapshots.length - 1];
        if (JSON.stringify(now) !== JSON.stringify(last)) window.ghSnapshots.push(now);
    });
    window.ghObserver.observe(panel, {subtree: true, childList: true, attributes: true, characterData: true});
}
"""
#: True once the observed run has disabled Run and then enabled it again (the run is over).
RUN_ENDED_JS = """
() => window.ghSnapshots.some((s) => s.runDisabled) && !document.querySelector('.gh-panel button.gh-run').disabled
"""


@dataclass
class LabServer:
    """A JupyterLab process serving one temporary root folder."""

    url: str
    token: str
    root: Path
    log_path: Path
    process: subprocess.Popen

    def api(self, path: str, method: str = "GET") -> Any:
        """Call the REST API with the token; the decoded JSON answer (None when empty)."""
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------- set-up
#: CI sets this to "required": there a missing browser fails the test instead of skipping it.
REQUIRED_ENV = "GPT_HELPERS_BROWSER_TEST"


def _require_browser_tools() -> None:
    """Skip, saying what to install, when Chromium or Playwright is missing; fail instead where CI requires them."""
    advice = (
        "Install it (Debian/Ubuntu: `sudo apt-get install chromium`; `pip install playwright`, no `playwright "
        "install` needed) or point GPT_HELPERS_CHROMIUM at a Chromium binary to run it."
    )
    missing = None
    if not Path(CHROMIUM).is_file():
        missing = f"Chromium not found at {CHROMIUM}. {advice}"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = f"The Python package playwright is not installed. {advice}"
    if missing and os.environ.get(REQUIRED_ENV) == "required":
        pytest.fail(f"{missing} ({REQUIRED_ENV}=required)", pytrace=False)
    if missing:
        pytest.skip(f"browser test skipped: {missing}")


def _prepare_lesson(root: Path) -> Path:
    """The lesson parameterized with its CI values (papermill, not executed) and without saved outputs."""
    import papermill

    notebook = root / LESSON.notebook
    papermill.execute_notebook(
        str(NOTEBOOKS_DIR / LESSON.notebook),
        str(notebook),
        parameters=LESSON.ci_parameters,
        prepare_only=True,
        progress_bar=False,
    )
    node = nbformat.read(notebook, as_version=4)
    for cell in node.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(node, notebook)
    return notebook


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(server: LabServer) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"JupyterLab exited with code {server.process.returncode}:\n{server.log()[-4000:]}", pytrace=False
            )
        try:
            server.api("/api/status")
            return
        except OSError:  # not listening yet (URLError and HTTPError are OSErrors)
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_SECONDS} s:\n{server.log()[-4000:]}", pytrace=False)


def _stop_server(server: LabServer) -> None:
    """Shut the kernels down through the API, then end the server's process group."""
    try:
        for kernel in server.api("/api/kernels"):
            server.api(f"/api/kernels/{kernel['id']}", method="DELETE")
    except OSError:
        pass  # the server is already gone: its process group is ended below
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def artefacts() -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    return ARTEFACTS


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory) -> Iterator[LabServer]:
    """JupyterLab on loopback with a random token, empty settings and config, serving a copy of the lesson."""
    _require_browser_tools()
    root = tmp_path_factory.mktemp("lab-root")
    _prepare_lesson(root)
    home = tmp_path_factory.mktemp("lab-home")
    folders = {name: home / name for name in ("config", "runtime", "ipython", "settings", "workspaces")}
    for folder in folders.values():
        folder.mkdir()
    (folders["config"] / "labconfig").mkdir()  # no "get notified about Jupyter news?" toast over the panel
    (folders["config"] / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}), encoding="utf-8"
    )
    token, port = secrets.token_hex(24), _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(folders["config"]),
        "JUPYTER_RUNTIME_DIR": str(folders["runtime"]),
        "IPYTHONDIR": str(folders["ipython"]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={folders['settings']}",
        f"--LabApp.workspaces_dir={folders['workspaces']}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]  # CI containers often run as root
    log_path = home / "jupyterlab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log_path, process)
    try:
        _wait_for_server(server)
        yield server
    finally:
        _stop_server(server)


@pytest.fixture(scope="module")
def page(lab_server: LabServer, tmp_path_factory) -> Iterator[Page]:
    """A headless Chromium page with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
        )
        try:
            context.set_default_timeout(30 * MS)
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _save_evidence(name: str, page: Page, server: LabServer, artefacts: Path) -> None:
    """A full-page screenshot and the JupyterLab log in the artefacts folder (best effort)."""
    shutil.copyfile(server.log_path, artefacts / f"{name}-jupyterlab.log")
    try:
        page.screenshot(path=str(artefacts / f"{name}-failure.png"), full_page=True)
    except Exception as error:  # noqa: BLE001 - the failure being reported matters more than its screenshot
        print(f"no failure screenshot: {error}")


@pytest.fixture(autouse=True)
def _evidence_on_failure(request, page: Page, lab_server: LabServer, artefacts: Path) -> Iterator[None]:
    """After a failed test, its evidence (the module fixtures are set up before this one, so they are live)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        _save_evidence(request.node.name, page, lab_server, artefacts)


# ----------------------------------------------------------------------------------------------------- the lesson
def _wait(condition: Callable[[], Any], seconds: float, message: Callable[[], str], poll: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something true; fail with ``message()`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(message(), pytrace=False)


def _kernel_states(server: LabServer) -> list[str]:
    """The execution state of each running kernel ("starting", "busy", "idle"…)."""
    try:
        return [kernel["execution_state"] for kernel in server.api("/api/kernels")]
    except urllib.error.HTTPError as error:  # jupyter_server can answer 500 while a kernel is starting
        return [f"unknown (HTTP {error.code})"]


def _prompts(page: Page) -> list[str]:
    """The execution prompt of every code cell, in order: "[3]:", "[*]:" (queued or running) or "[ ]:"."""
    return page.eval_on_selector_all(
        ".jp-Notebook .jp-CodeCell .jp-InputArea-prompt", "nodes => nodes.map(n => n.textContent.trim())"
    )


def _error_outputs(page: Page) -> list[str]:
    """Texts of outputs that show a Python error: a traceback, or an error line on stderr."""
    return page.eval_on_selector_all(
        ".jp-OutputArea-output",
        """nodes => nodes.filter(n => /Traceback/.test(n.innerText)
            || n.dataset.mimeType === 'application/vnd.jupyter.stderr' && /^\\w+(Error|Exception): /m.test(n.innerText))
            .map(n => n.innerText)""",
    )


def _lesson_finished(page: Page, server: LabServer, code_cells: int) -> bool:
    """Every shown code cell has an execution count and the kernel is idle; fails at once on an error output."""
    errors = _error_outputs(page)
    if errors:
        pytest.fail(f"A cell failed in the browser:\n{errors[0][-3000:]}", pytrace=False)
    prompts = _prompts(page)
    done = len(prompts) == code_cells and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
    return done and _kernel_states(server) == ["idle"]


@pytest.fixture(scope="module")
def lesson(page: Page, lab_server: LabServer, artefacts: Path) -> Path:
    """The lesson opened in JupyterLab and run with Run → Run All Cells, as a learner does; its saved file."""
    try:
        return _run_lesson(page, lab_server)
    except BaseException:  # pytest.fail raises an OutcomeException, not an Exception
        _save_evidence("run-all-cells", page, lab_server, artefacts)
        raise


def _run_lesson(page: Page, lab_server: LabServer) -> Path:
    notebook = lab_server.root / LESSON.notebook
    code_cells = sum(  # a cell whose input is hidden (an exercise's solution) shows no prompt until it is opened
        cell.cell_type == "code" and not cell.metadata.get("jupyter", {}).get("source_hidden")
        for cell in nbformat.read(notebook, as_version=4).cells
    )
    page.goto(f"{lab_server.url}/lab/tree/{LESSON.notebook}?token={lab_server.token}", timeout=90 * MS)
    page.locator(".jp-Notebook .jp-CodeCell").first.wait_for(timeout=90 * MS)
    _wait(
        lambda: _kernel_states(lab_server) == ["idle"],
        90,
        lambda: f"The kernel did not start and become idle: {_kernel_states(lab_server)}",
    )
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu").get_by_role("menuitem", name="Run All Cells", exact=True).click()
    _wait(
        lambda: _lesson_finished(page, lab_server, code_cells),
        LESSON_SECONDS,
        lambda: f"Run All Cells did not finish in {LESSON_SECONDS} s; prompts: {_prompts(page)}",
        poll=1.0,
    )
    saved_before = notebook.stat().st_mtime_ns
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    _wait(lambda: notebook.stat().st_mtime_ns != saved_before, 30, lambda: "Ctrl+S did not save the notebook")
    return notebook


def test_the_lesson_runs_in_jupyterlab_without_errors(lesson: Path, page: Page) -> None:
    saved = nbformat.read(lesson, as_version=4)
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "every code cell of the saved notebook has run"
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors, f"a saved output is an error: {errors[0].ename}: {errors[0].evalue}"
    assert not _error_outputs(page), "no error output in the page"
    panel_outputs = [
        o for cell in code for o in cell.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert panel_outputs, "the panel cell displayed a live widget"


# ----------------------------------------------------------------------------------------------------- the panel
@pytest.fixture(scope="module")
def panel(lesson: Path, page: Page, artefacts: Path) -> Locator:
    """The training panel as rendered in the lesson; a screenshot of it before anything is changed."""
    panel = page.locator(".gh-panel")
    panel.wait_for(state="visible")
    _screenshot(panel, artefacts / "panel-before.png")
    return panel


def _screenshot(panel: Locator, path: Path) -> None:
    """The panel alone, scrolled to the top of the notebook so that all of it is in the viewport."""
    panel.evaluate("(element) => element.scrollIntoView({block: 'start'})")
    panel.screenshot(path=str(path))


def _type_into(field: Locator, text: str) -> None:
    """Replace a field's text by typing, as a learner does, and confirm with Enter."""
    field.click()
    field.press("Control+a")
    field.press_sequentially(text)
    field.press("Enter")


def _set_steps(panel: Locator, steps: str) -> None:
    _type_into(panel.locator(".gh-steps input"), steps)


def _press(panel: Locator, button: str) -> None:
    """Press Run or Stop once it is enabled."""
    locator = panel.locator(f"button.gh-{button}")
    locator.wait_for(state="visible")
    _wait(locator.is_enabled, 30, lambda: f"{button} did not become enabled")
    locator.click()


def _start_observing(panel: Locator) -> None:
    panel.evaluate(OBSERVE_PANEL_JS)


def _wait_for_run_end(page: Page) -> list[dict[str, Any]]:
    """Wait until the run started by Run has ended; what the panel showed meanwhile."""
    page.wait_for_function(RUN_ENDED_JS, timeout=PANEL_RUN_SECONDS * MS, polling=200)
    return page.evaluate("() => window.ghSnapshots")


def _table(panel: Locator, css: str) -> dict[str, str]:
    rows = panel.locator(f".gh-summary table.{css} tr").all_inner_texts()
    return dict(row.split("\t", 1) for row in rows if "\t" in row)


def _status(panel: Locator) -> str:
    return panel.locator(".gh-status").inner_text()


def test_a_run_uses_the_settings_typed_in_the_panel(panel: Locator, page: Page, artefacts: Path) -> None:
    _type_into(panel.locator(".gh-lr .widget-readout"), "1e-3")
    _set_steps(panel, "30")
    _start_observing(panel)
    _press(panel, "run")
    seen = _wait_for_run_end(page)

    assert any(s["runDisabled"] and s["stepsDisabled"] for s in seen), "Run and the controls are disabled meanwhile"
    assert not panel.locator("button.gh-run").is_disabled(), "Run is enabled again after the run"
    progress = sorted({s["progress"] for s in seen if s["progress"] is not None})
    assert any(0 < p < 100 for p in progress) and progress[-1] == 100, f"the progress bar moves: {progress}"
    plots = {s["plot"] for s in seen if s["plot"] is not None}
    assert len(plots) >= 2, f"the loss plot appears and is redrawn during the run ({len(plots)} image(s) seen)"
    assert panel.locator(".gh-error").count() == 0, _status(panel)
    used = _table(panel, "gh-config")
    assert used.get("learning rate") == "1.0e-03", used
    assert used.get("steps (asked / done)") == "30 / 30", used
    assert "final validation" in _table(panel, "gh-result")
    assert not _error_outputs(page)
    _screenshot(panel, artefacts / "panel-after.png")


def test_stop_ends_a_long_run_cleanly(panel: Locator, page: Page, artefacts: Path) -> None:
    _set_steps(panel, "2000")
    _start_observing(panel)
    _press(panel, "run")
    page.wait_for_function(  # training has started and drawn this run's first curves
        "() => window.ghSnapshots.some((s) => s.progress > 0 && s.plot && s.plot !== window.ghSnapshots[0].plot)",
        timeout=PANEL_RUN_SECONDS * MS,
        polling=100,
    )
    _press(panel, "stop")
    _wait_for_run_end(page)

    asked, done = (int(n) for n in _table(panel, "gh-config")["steps (asked / done)"].split(" / "))
    assert asked == 2000 and 0 < done < asked, f"stopped early: {done} of {asked} steps"
    assert panel.locator(".gh-status .gh-success").count() == 1, f"a clean stop is a success: {_status(panel)}"
    assert "stopped from the panel" in _status(panel)
    assert panel.locator(".gh-error").count() == 0
    assert panel.locator(".gh-plot img").count() == 1, "the loss plot is kept after Stop"
    assert panel.locator("button.gh-stop").is_disabled() and panel.locator("button.gh-run").is_enabled()
    assert not _error_outputs(page)
    _screenshot(panel, artefacts / "panel-stopped.png")


def test_an_impossible_value_is_explained_in_the_panel(panel: Locator, page: Page, artefacts: Path) -> None:
    _set_steps(panel, "0")
    _press(panel, "run")
    error = panel.locator(".gh-status .gh-error")
    error.wait_for(state="visible")
    message = error.inner_text()
    assert "steps must be a whole number from 1" in message and "not 0" in message, message
    assert "Traceback" not in message and not _error_outputs(page)
    bar = panel.locator(".gh-progress .progress-bar").get_attribute("class")
    assert "progress-bar-danger" not in bar, "nothing ran: the bar still shows the last run as it ended"
    _screenshot(panel, artefacts / "panel-error.png")

    _set_steps(panel, "4")  # Run stays usable: a valid value trains again
    _start_observing(panel)
    _press(panel, "run")
    _wait_for_run_end(page)
    assert panel.locator(".gh-error").count() == 0, _status(panel)
    assert _table(panel, "gh-config")["steps (asked / done)"] == "4 / 4"
