"""Issue 23's user story in a real browser on a real ComfyUI with the pack: a person trains a student in the
background, samples meanwhile, stops the job, is told in words why the student cannot load, and watches X-Slim
Compare's progress bar. Headless Chromium (the system's) through Playwright, on whichever frontend the host serves.

1. A 1.x-Distill job (the demo teacher, many iterations) runs in its worker while the X-Slim demo's sampling half,
   queued from the UI, runs to success: the prompt ends while the job is still running
   (``training_while_sampling.png``: the jobs panel with the running job, the canvas with the sampled images).
2. The panel's Cancel stops the job; the distill workflow's sampling part (Job Status, wait_for_finish off, feeding
   Load 1.x Student) queued from the UI ends in the frontend's error, which names the state ("stopped") and
   Resume and shows no absolute path (``stopped_job_message.png``).
3. The X-Slim demo with its Compare node, queued from the UI, photographed while Compare's progress (the
   websocket's 'progress' events for that node) is between 0 and its total (``compare_progress.png``).

The tests run in order on one page and one server (each step is the next thing the person does). Screenshots go
to <repo>/out/browser/user-story-<frontend version>; XSLIM_SAVE_BROWSER_DOCS=<folder> copies them to
<folder>/<frontend version>/. The shipped workflows at fit-to-view are test_browser_workflows.py's.
"""

from __future__ import annotations

import json
import os
import re

import pytest

import browser_env
from server_env import Server, make_base
from test_browser_workflows import read
from test_train_jobs import DEMO, stop_active_jobs, train_prompt, wait_job

pytestmark = browser_env.SKIP_MARKS
JOB = "story-distill"
CARD = f'.xslim-job[data-job="{JOB}"]'

# every websocket 'progress' event the page receives, and the prompt ids the frontend queued
LISTEN = """() => {
    const api = window.app.api || (window.comfyAPI && window.comfyAPI.api && window.comfyAPI.api.api);
    window.xslimProgress = [];
    api.addEventListener('progress', e => window.xslimProgress.push(e.detail));
    return !!api;
}"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("comfy_story"))
    browser_env.quiet_first_visit(base)
    server = Server(base).start()
    yield server
    stop_active_jobs(server)  # leave no worker behind
    server.stop()


@pytest.fixture(scope="module")
def page(srv):
    with browser_env.chromium() as browser:
        page = browser_env.open_comfy(browser, srv.url)
        assert page.evaluate(LISTEN)
        # frontend 1.27.10 throws once while it registers its own settings (Comfy.Canvas.NavigationMode's onChange
        # sets a setting not yet registered), before any graph or pack UI is involved: shown, not held against a step
        print("page errors while the frontend started:", page.xslim_error_stacks)
        page.xslim_errors.clear()
        page.xslim_error_stacks.clear()
        yield page


@pytest.fixture(scope="module")
def shots(page):
    return browser_env.artifacts_dir(f"user-story-{browser_env.frontend_version(page)}")

# the text of the dialog, notification or panel (not the jobs panel) that shows the node's message to a person: the
# innermost element holding the message, widened to the dialog / alert / side panel it sits in
SHOWN = """() => {
    const hits = [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null && !e.closest('.xslim-job')
        && !['SCRIPT', 'STYLE', 'TEXTAREA'].includes(e.tagName) && /was stopped at/.test(e.innerText || ''));
    const inner = hits.filter(e => !hits.some(h => h !== e && e.contains(h)));
    return inner.map(e => (e.closest('[role=dialog], [role=alertdialog], [role=alert], [role=tabpanel], aside') || e.parentElement).innerText);
}"""
VIEW_DETAILS = "[...document.querySelectorAll('button')].some(b => b.offsetParent !== null && /^\\s*view details\\s*$/i.test(b.innerText))"

CLOSE_RIGHT_PANEL = """async () => {
    const setting = app.extensionManager && app.extensionManager.setting;
    if (setting && setting.get('Comfy.RightSidePanel.IsOpen')) await setting.set('Comfy.RightSidePanel.IsOpen', false);
}"""


def without(workflow: dict, types: tuple[str, ...]) -> dict:
    """The workflow without the nodes of these types, the nodes only they fed, their links, and any group left
    empty (what a person gets by deleting them and tidying up)."""
    gone = {n["id"] for n in workflow["nodes"] if n["type"] in types}
    fed = {li[3] for li in workflow["links"] if li[1] in gone}
    gone |= {t for t in fed if all(li[1] in gone for li in workflow["links"] if li[3] == t)}
    links = [li for li in workflow["links"] if li[1] not in gone and li[3] not in gone]
    kept_links = {li[0] for li in links}
    nodes = []
    for n in workflow["nodes"]:
        if n["id"] in gone:
            continue
        n = json.loads(json.dumps(n))
        for out in n.get("outputs") or []:
            out["links"] = [li for li in out.get("links") or [] if li in kept_links]
        nodes.append(n)

    def holds(g, n):
        x, y, w, h = g["bounding"]
        return x <= n["pos"][0] <= x + w and y <= n["pos"][1] <= y + h

    groups = [g for g in workflow.get("groups", []) if any(holds(g, n) for n in nodes)]
    return {**workflow, "nodes": nodes, "links": links, "groups": groups}


# Fit View for the part of the canvas a person sees: right of an open side panel, below the top bars
FIT_VISIBLE = """(only) => {
    const c = app.canvas, rect = c.canvas.getBoundingClientRect();
    const panel = [...document.querySelectorAll('.xslim-job')].filter(e => e.offsetParent !== null)
        .map(e => e.getBoundingClientRect().right);  // the jobs panel's cards, when it is open
    let left = Math.max(rect.left, ...panel.map(r => r + 8)), top = rect.top + 90;
    const right = rect.right - 20, bottom = rect.bottom - 70;
    const groups = (app.graph._groups || app.graph.groups || []).map(g => [g.pos[0], g.pos[1], g.size[0], g.size[1], g.title]);
    const boxes = only ? groups.filter(g => only.some(t => g[4].startsWith(t)))  // those groups only (a closer view)
        : app.graph._nodes.map(n => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT])
            .concat(groups);
    const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
    const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
    const scale = Math.min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0));
    c.ds.scale = scale;
    c.ds.offset[0] = (left - rect.left + ((right - left) - (x1 - x0) * scale) / 2) / scale - x0;
    c.ds.offset[1] = (top - rect.top + ((bottom - top) - (y1 - y0) * scale) / 2) / scale - y0;
    c.setDirty(true, true);
    return scale;
}"""


def load(page, workflow: dict, name: str, only: list[str] | None = None) -> None:
    """Load as the Templates browser does, then fit the view (to the groups whose titles begin with ``only``)."""
    page.evaluate("([data, name]) => app.loadGraphData(data, true, true, name)", [workflow, name])
    page.evaluate(FIT_VISIBLE, only)


def queue_from_ui(page, srv, before: set[str]) -> str:
    """Queue the loaded graph as the Run button does; the prompt id the server got from this page."""
    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function("""async (before) => {
        const r = await fetch('/queue'), q = await r.json(), h = await (await fetch('/history')).json();
        const ids = [...q.queue_running, ...q.queue_pending].map(i => i[1]).concat(Object.keys(h));
        return ids.some(id => !before.includes(id));
    }""", arg=sorted(before), timeout=120_000, polling=500)
    queue = srv.get("/queue")
    ids = [i[1] for i in queue["queue_running"] + queue["queue_pending"]] + list(srv.get("/history"))
    return next(i for i in ids if i not in before)


def prompt_ids(srv) -> set[str]:
    queue = srv.get("/queue")
    return set(srv.get("/history")) | {i[1] for i in queue["queue_running"] + queue["queue_pending"]}


def test_a_prompt_samples_to_success_while_a_distill_job_trains(page, srv, shots):
    started = srv.run(train_prompt(JOB, model=DEMO, iterations=100_000, cached_blocks="4-6", lr_student=4e-5,
                                   lr_fake=3.2e-4, preview_every=10, checkpoint_every=50))
    assert started["status"]["status_str"] == "success", started["status"]  # the Train node returns at once
    wait_job(srv, JOB, lambda j: j["state"] == "running" and j["iteration"] >= 10 and j["preview"], what="training")
    browser_env.open_sidebar_tab(page, "1.x-Distill")
    page.wait_for_selector(f'{CARD}[data-state="running"]', timeout=120_000)
    load(page, without(read("xslim_demo_cpu.json"), ("XSlimCompare",)), "xslim_demo_sampling.json", only=["Sample and save"])
    assert not page.evaluate("() => app.graph._nodes.some(n => n.type === 'XSlimCompare')")
    before = srv.get(f"/xslim/jobs/{JOB}")
    prompt = queue_from_ui(page, srv, prompt_ids(srv))
    result = srv.wait(prompt)
    after = srv.get(f"/xslim/jobs/{JOB}")
    assert result["status"]["status_str"] == "success", result["status"]
    assert {p["class_type"] for p in result["prompt"][2].values()} >= {"XSlimCache", "KSampler", "SaveImage"}
    # the job trained through the whole prompt: running before it was queued and after it ended, and it moved on
    assert before["state"] == after["state"] == "running", (before["state"], after["state"])
    assert after["iteration"] > before["iteration"] and after["iteration"] < after["iterations"], (before, after)
    save = next(n["id"] for n in read("xslim_demo_cpu.json")["nodes"] if n["type"] == "SaveImage" and not n.get("title"))
    page.wait_for_function("(id) => { const n = app.graph.getNodeById(id); return n && n.imgs && n.imgs.length"
                           " && n.imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=save, timeout=120_000)
    page.wait_for_selector(f'{CARD}[data-state="running"]', timeout=60_000)
    page.wait_for_timeout(500)  # the panel's loss image and the canvas finish drawing
    page.screenshot(path=os.path.join(shots, "training_while_sampling.png"))
    assert srv.get(f"/xslim/jobs/{JOB}")["state"] == "running"
    assert not page.xslim_errors and not page.xslim_dialogs, (page.xslim_error_stacks, page.xslim_dialogs)
    browser_env.save_docs(page, shots, ["training_while_sampling.png"])


def test_a_stopped_jobs_student_fails_to_load_with_a_sentence_naming_stopped_and_resume(page, srv, shots):
    page.locator(f"{CARD} button.xslim-job-cancel").click()  # the panel is still open (the previous test)
    page.wait_for_selector(f'{CARD}[data-state="stopped"]', timeout=300_000)
    assert srv.get(f"/xslim/jobs/{JOB}")["state"] == "stopped"
    page.keyboard.press("Escape")
    # the distill workflow's sampling part: Job Status (wait_for_finish off) feeds Load 1.x Student; the job's
    # name comes from a String node in place of the Train node (queuing Train again would resume the job)
    workflow = read("xslim_distill_demo_cpu.json")
    load(page, workflow, "xslim_distill_demo_cpu.json")
    page.evaluate("""(job) => {
        const train = app.graph._nodes.find(n => n.type === 'XSlimDistillTrain');
        const status = app.graph._nodes.find(n => n.type === 'XSlimDistillJobStatus');
        const name = LiteGraph.createNode('PrimitiveString');
        name.title = 'job name';
        name.pos = [train.pos[0], train.pos[1]];
        app.graph.add(name);
        name.widgets[0].value = job;
        app.graph.remove(train);
        name.connect(0, status, 0);
        if (status.widgets[0].value !== false) throw new Error('wait_for_finish is on in the shipped workflow');
    }""", JOB)
    page.evaluate(FIT_VISIBLE, None)
    prompt = queue_from_ui(page, srv, prompt_ids(srv))
    result = srv.wait(prompt)
    assert result["status"]["status_str"] == "error", result["status"]
    error = next(m[1] for m in result["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "XSlimStudentLoader", error
    # what the frontend shows: 1.27 opens an error dialog with the node's message; 1.58 a notification ("Load 1.x
    # Student failed") whose "View details" opens the message: a person clicks it, so the test does
    details = page.get_by_role("button", name=re.compile(r"^\s*view details\s*$", re.I))
    try:
        page.wait_for_function(f"() => ({SHOWN})().length > 0 || {VIEW_DETAILS}", timeout=120_000)
        if not page.evaluate(SHOWN) and details.count():
            details.first.click()
        page.wait_for_function(f"() => ({SHOWN})().length > 0", timeout=60_000)
    except Exception:
        page.screenshot(path=os.path.join(shots, "stopped_job_message_not_found.png"))
        raise AssertionError("the frontend shows no message naming the stopped job; it shows: "
                             + page.evaluate("() => document.body.innerText")[:3000]) from None
    page.wait_for_timeout(500)
    text = "\n".join(page.evaluate(SHOWN))
    page.screenshot(path=os.path.join(shots, "stopped_job_message.png"))
    assert "stopped" in text and "Resume" in text, text
    assert JOB in text, text
    # 1.58 shows ComfyUI's whole error report: the node's part (type and message) first, then ComfyUI's own stack
    # trace and system information, which name the host's files (not the pack's to change): the node's part is checked
    pack_part = text.split("## Stack Trace")[0]
    for absolute in ("/tmp", "/work", "/home", "/root", os.path.expanduser("~")):
        assert absolute not in pack_part, (absolute, pack_part)
    browser_env.save_docs(page, shots, ["stopped_job_message.png"])
    for _ in range(3):
        if not page.evaluate(browser_env.VISIBLE_DIALOGS):
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def test_compare_shows_its_progress_bar_mid_run(page, srv, shots):
    workflow = read("xslim_demo_cpu.json")
    compare = next(n["id"] for n in workflow["nodes"] if n["type"] == "XSlimCompare")
    page.evaluate(CLOSE_RIGHT_PANEL)  # 1.58's error details (the previous test) off the canvas
    load(page, workflow, "xslim_demo_cpu.json", only=["X-Slim Compare"])
    page.evaluate("() => { window.xslimProgress = []; }")
    prompt = queue_from_ui(page, srv, prompt_ids(srv))
    # Compare's bar counts its sampling runs (warm-up, then rounds of every setting); the picture is taken at the
    # first event that puts it between 0 and its total, whatever the machine's pace
    mid = """(id) => window.xslimProgress.find(p => String(p.node) === String(id) && p.value > 0 && p.value < p.max)"""
    while not page.evaluate(mid, compare):
        srv.assert_alive()
        assert srv.in_queue(prompt), f"the Compare prompt ended without a progress event between 0 and its total: {srv.get(f'/history/{prompt}')}"
        page.wait_for_timeout(250)
    page.wait_for_timeout(300)  # the canvas draws the bar at its next frame
    page.screenshot(path=os.path.join(shots, "compare_progress.png"))
    seen = page.evaluate(mid, compare)
    assert srv.in_queue(prompt), "Compare had finished when the picture was taken"
    assert 0 < seen["value"] < seen["max"], seen
    srv.post("/interrupt", {})  # the rest of the comparison is not this test's business
    result = srv.wait(prompt)
    assert result["status"]["status_str"] in ("error", "success"), result["status"]
    assert not page.xslim_errors, page.xslim_error_stacks
    browser_env.save_docs(page, shots, ["compare_progress.png"])
