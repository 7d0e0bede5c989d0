"""Every shipped workflow as a person sees it: loaded by ComfyUI's own frontend in headless Chromium.

For each file in workflows/ the frontend's ``app.loadGraphData`` must raise no alert, no error toast and no
dialog other than the missing-models one (which must then name every file with its folder and source), leave
no missing or red node, and place no node over another. The CPU demo is then queued from the UI (Ctrl+Enter)
and its output images must appear in the nodes. Screenshots go to the folder the test prints
(XSLIM_BROWSER_ARTIFACTS to choose it); XSLIM_SAVE_BROWSER_DOCS=docs/comfyui copies the best ones there.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

import browser_env
import comfy_env as ce
from server_env import Server, make_base

pytestmark = browser_env.SKIP_MARKS
WORKFLOWS = os.path.join(ce.REPO, "workflows")
NAMES = sorted(n for n in os.listdir(WORKFLOWS) if n.endswith(".json"))

# What the canvas holds after a load: nodes (with their title bar), groups, and anything wrong with them.
GRAPH_STATE = """() => {
    const T = LiteGraph.NODE_TITLE_HEIGHT;
    const nodes = app.graph._nodes.map(n => ({
        id: n.id, type: n.type, title: n.title, x: n.pos[0], y: n.pos[1] - T, w: n.size[0],
        h: (n.flags && n.flags.collapsed) ? T : n.size[1] + T,
        registered: n.type in LiteGraph.registered_node_types, errors: !!n.has_errors,
        red: ['#f00', '#ff0000', '#a00', '#aa0000', 'red'].includes(String(n.color || n.bgcolor || '').toLowerCase()),
    }));
    const groups = (app.graph._groups || app.graph.groups || []).map(g => ({title: g.title, x: g.pos[0], y: g.pos[1],
        w: g.size[0], h: g.size[1]}));
    return {nodes, groups};
}"""
VISIBLE_DIALOGS = """() => [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)
    .map(d => d.innerText)"""
ERROR_TOASTS = """() => [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')].map(t => t.innerText)"""


def overlaps(boxes: list[dict], pad: float = 0.0) -> list[tuple]:
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] - pad and b["x"] < a["x"] + a["w"] - pad and a["y"] < b["y"] + b["h"] - pad and b["y"] < a["y"] + a["h"] - pad:
                found.append((a.get("title") or a.get("type"), b.get("title") or b.get("type")))
    return found


def expected_models(workflow: dict) -> list[dict]:
    return [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfy_workflows"))
    browser_env.quiet_first_visit(base)
    server = Server(base).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(srv):
    with browser_env.chromium() as browser:
        yield browser_env.open_comfy(browser, srv.url)


@pytest.fixture(scope="module")
def shots():
    return browser_env.artifacts_dir("workflows")


def load(page, workflow: dict, name: str) -> dict:
    """Load through the frontend as the Templates browser does; what the person then sees."""
    page.xslim_dialogs.clear()
    page.evaluate("([data, name]) => app.loadGraphData(data, true, true, name)", [workflow, name])
    page.wait_for_timeout(800)  # dialogs and toasts open asynchronously after the load resolves
    return {"state": page.evaluate(GRAPH_STATE), "dialogs": page.evaluate(VISIBLE_DIALOGS), "toasts": page.evaluate(ERROR_TOASTS),
            "alerts": list(page.xslim_dialogs)}


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.evaluate(VISIBLE_DIALOGS):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def test_every_workflow_loads_in_the_frontend_without_alerts_missing_red_or_overlapping_nodes(page, shots):
    problems, report = [], []
    start = time.perf_counter()
    for name in NAMES:
        with open(os.path.join(WORKFLOWS, name)) as f:
            workflow = json.load(f)
        seen = load(page, workflow, name)
        nodes, groups = seen["state"]["nodes"], seen["state"]["groups"]
        models = expected_models(workflow)
        dialogs = seen["dialogs"]
        if models:  # the files are not on this machine: the missing-models dialog must name each one
            text = "\n".join(dialogs)
            for m in models:
                if m["name"] not in text or m["directory"] not in text:
                    problems.append(f"{name}: the missing-models dialog does not name {m['directory']}/{m['name']}: {text[:300]!r}")
            dialogs = [d for d in dialogs if not all(m["name"] in d for m in models)]
        problems += [f"{name}: alert {a!r}" for a in seen["alerts"]]
        problems += [f"{name}: dialog {d[:200]!r}" for d in dialogs]
        problems += [f"{name}: toast {t[:200]!r}" for t in seen["toasts"]]
        problems += [f"{name}: missing node type {n['type']}" for n in nodes if not n["registered"]]
        problems += [f"{name}: red node {n['type']}" for n in nodes if n["errors"] or n["red"]]
        problems += [f"{name}: nodes overlap: {a} / {b}" for a, b in overlaps(nodes)]
        problems += [f"{name}: groups overlap: {a} / {b}" for a, b in overlaps(groups)]
        assert len(nodes) == len(workflow["nodes"]), f"{name}: {len(nodes)} nodes on the canvas, {len(workflow['nodes'])} in the file"
        report.append(f"{name}: {len(nodes)} nodes, {len(groups)} groups, {len(models)} model files, "
                      f"{len(seen['alerts']) + len(dialogs) + len(seen['toasts'])} alerts/dialogs/toasts, {len(overlaps(nodes))} overlaps")
        close_dialogs(page)
        page.screenshot(path=os.path.join(shots, name[:-5] + ".png"))
    print("\n".join(report), f"\nloaded {len(NAMES)} workflows in {time.perf_counter() - start:.1f} s")
    assert not problems, "\n".join(problems)


def test_the_flux_workflow_without_its_models_opens_the_missing_models_dialog_naming_file_folder_and_source(page, shots):
    with open(os.path.join(WORKFLOWS, "xslim_flux_dev.json")) as f:
        workflow = json.load(f)
    seen = load(page, workflow, "xslim_flux_dev.json")
    text = "\n".join(seen["dialogs"])
    page.screenshot(path=os.path.join(shots, "missing_models_dialog.png"))
    for m in expected_models(workflow):
        assert m["name"] in text and m["directory"] in text, (m, text)
    # where each file comes from: the dialog's download links point at the sources in the workflow
    urls = page.evaluate("""() => [...document.querySelectorAll('.p-dialog a, .p-dialog [title]')]
        .map(e => e.href || e.title || '')""")
    sources = " ".join(urls) + text
    hosts = {m["url"].split("/")[2] for m in expected_models(workflow)}
    assert all(h in sources for h in hosts) or "download" in text.lower(), (hosts, urls, text)
    close_dialogs(page)


def test_the_cpu_demo_runs_from_the_ui_and_its_images_appear(page, srv, shots):
    with open(os.path.join(WORKFLOWS, "xslim_demo_cpu.json")) as f:
        workflow = json.load(f)
    seen = load(page, workflow, "xslim_demo_cpu.json")
    assert not seen["alerts"] and not seen["dialogs"], seen
    page.mouse.click(800, 950)  # focus the canvas (an empty spot), then the Run shortcut
    start = time.perf_counter()
    page.keyboard.press("Control+Enter")
    image_nodes = [n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    page.wait_for_function("""(ids) => ids.every(id => { const n = app.graph.getNodeById(id);
        return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0); })""",
                           arg=image_nodes, timeout=420_000, polling=1000)
    seconds = time.perf_counter() - start
    page.wait_for_timeout(1500)  # the last previews draw
    state = page.evaluate(GRAPH_STATE)
    texts = page.evaluate("""() => app.graph._nodes.filter(n => n.type === 'PreviewAny')
        .map(n => (n.widgets || []).map(w => String(w.value ?? '')).join('\\n'))""")
    page.screenshot(path=os.path.join(shots, "demo_after_run.png"))
    print(f"demo workflow from the UI: images after {seconds:.1f} s")
    assert not overlaps(state["nodes"]), overlaps(state["nodes"])
    assert not page.xslim_dialogs, page.xslim_dialogs
    assert any("effective NFE" in t for t in texts), texts
    target = os.environ.get("XSLIM_SAVE_BROWSER_DOCS")
    if target:
        shutil.copyfile(os.path.join(shots, "demo_after_run.png"), os.path.join(target, "browser_demo_after_run.png"))
        shutil.copyfile(os.path.join(shots, "missing_models_dialog.png"), os.path.join(target, "browser_missing_models.png"))
        shutil.copyfile(os.path.join(shots, "xslim_flux_dev.png"), os.path.join(target, "browser_flux_workflow.png"))
