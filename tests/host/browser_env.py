"""A real browser on a real ComfyUI server, for tests that look at the pack as a person does.

Headless Chromium from the system (Debian's ``chromium``) driven by Playwright's Python package; no browser is
downloaded. Without either, ``SKIP_MARKS`` skips the module saying what to install. Shared by the browser tests:

    pytestmark = browser_env.SKIP_MARKS
    with browser_env.chromium() as browser:
        page = browser_env.open_comfy(browser, server.url)

``open_comfy`` records every alert/confirm/prompt and page error on ``page.xslim_dialogs`` / ``page.xslim_errors``
(an alert is dismissed, so a test can go on and report all of them at the end), and answers every request for
another host itself (refused, as offline), recording it on ``page.xslim_external``.

The tests run on more than one frontend (1.27.10, bundled with ComfyUI 0.3.64; 1.58.1, the newest): they find
the pack's UI by what the pack sets (ids, data attributes, its own text), the frontend's by roles and the text a
person reads, never by the frontend's CSS classes, which change between releases.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

SKIP_MARKS = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: `apt-get install chromium` (what .ci/run does as root)"),
    pytest.mark.skipif(sync_playwright is None, reason="Playwright's Python package is missing: `pip install -r requirements-host.txt`"),
]

# first-visit UI that would sit over the canvas: the templates dialog for new users, the release-notes toast,
# the minimap (it hides part of every screenshot)
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Release.Timestamp": 4102444800000, "Comfy.Minimap.Visible": False,
                  "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # text stays drawn in zoomed-out screenshots
                  "Comfy.Graph.CanvasInfo": False}  # the FPS / node-count overlay in the corner


def quiet_first_visit(base: str) -> None:
    """Write the user settings that keep first-visit dialogs away (call before the server starts)."""
    folder = os.path.join(base, "user", "default")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "comfy.settings.json"), "w") as f:
        json.dump(QUIET_SETTINGS, f)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def artifacts_dir(name: str) -> str:
    """Where a browser test keeps its screenshots: $XSLIM_BROWSER_ARTIFACTS/<name>, else <repo>/out/browser/<name>
    (git-ignored), so the pictures of the last run are still there to look at, and CI can keep them."""
    root = os.environ.get("XSLIM_BROWSER_ARTIFACTS") or os.path.join(REPO, "out", "browser")
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    print(f"browser screenshots: {path}")
    return path


@contextlib.contextmanager
def chromium():
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def open_comfy(browser, url: str, width: int = 1600, height: int = 1000):
    """A page on ComfyUI's frontend, once its app and node definitions are ready."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.xslim_dialogs, page.xslim_errors = [], []

    def on_dialog(dialog):
        page.xslim_dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.xslim_error_stacks = []  # the same errors with where they came from, for a failure message

    def on_error(err):
        page.xslim_errors.append(str(err))
        page.xslim_error_stacks.append(err.stack)

    page.on("pageerror", on_error)
    page.xslim_external = []  # (method, url) of every request that would leave the test machine

    def external(route):  # a test never reaches the internet: refused here as on an offline machine (the
        page.xslim_external.append((route.request.method, route.request.url))  # missing-models dialog sizes each
        route.abort("internetdisconnected")  # download with a HEAD request, and then shows "Download (?)")

    page.route(lambda u: not u.startswith(url.rstrip("/")), external)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && Object.keys(LiteGraph.registered_node_types).length > 100", timeout=120_000)
    page.keyboard.press("Escape")  # any first-visit dialog the settings did not prevent
    return page


def frontend_version(page) -> str:
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")


def save_docs(page, shots: str, names: list[str]) -> None:
    """XSLIM_SAVE_BROWSER_DOCS=<folder>: copy these screenshots of ``shots`` to <folder>/<frontend version>/ (how
    docs/comfyui/<version>/ gets them); each test copies its own."""
    target = os.environ.get("XSLIM_SAVE_BROWSER_DOCS")
    if not target:
        return
    folder = os.path.join(target, frontend_version(page))
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(shots, name), os.path.join(folder, name))


# what the frontend shows over the canvas: dialogs and notifications, by their ARIA roles
VISIBLE_DIALOGS = """() => [...document.querySelectorAll('[role=dialog], [role=alertdialog]')]
    .filter(d => d.offsetParent !== null && d.innerText.trim()).map(d => d.innerText)"""
VISIBLE_ALERTS = """() => [...document.querySelectorAll('[role=alert]')]
    .filter(t => t.offsetParent !== null && t.innerText.trim()).map(t => t.innerText)"""
# the section of a side panel that lists missing models (newer frontends list them there, not in a dialog)
MISSING_MODELS_SECTION = """() => {
    const heading = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0 && e.offsetParent !== null
        && /^missing models$/i.test(e.textContent.trim()));
    const box = heading && (heading.closest('section') || heading.parentElement.parentElement);
    return box ? box.innerText : null;
}"""


def missing_models_text(page) -> str:
    """The text a person reads about the missing model files of the loaded workflow: frontend 1.27 opens a dialog;
    newer ones show a notice whose "View details" opens the list in a side panel."""
    dialogs = "\n".join(page.evaluate(VISIBLE_DIALOGS))
    if re.search(r"missing", dialogs, re.I):
        return dialogs
    listed = page.evaluate(MISSING_MODELS_SECTION)  # the panel is open already (it follows the loaded workflow)
    if listed:
        return listed
    details = page.get_by_role("button", name=re.compile(r"^\s*view details\s*$", re.I))
    if details.count():
        details.first.click()
        page.wait_for_function(MISSING_MODELS_SECTION, timeout=10_000)
        return page.evaluate(MISSING_MODELS_SECTION)
    return dialogs


def open_sidebar_tab(page, title: str, timeout: float = 90_000):
    """Click the sidebar tab the pack registered with this title (its accessible name or its text)."""
    button = page.get_by_role("button", name=re.compile(re.escape(title)))
    button.first.wait_for(timeout=timeout)
    button.first.click()
