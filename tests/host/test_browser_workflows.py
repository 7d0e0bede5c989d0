"""Every shipped workflow as a person sees it: loaded by ComfyUI's own frontend in headless Chromium.

* The frontend's own size of every node type the workflows use (``LiteGraph.createNode(type).size``) must match
  its entry in ``workflows/layout/node_sizes.json`` (one per tested frontend version; the generators lay out with
  the larger size of each type, so no frontend's nodes overlap; ``XSLIM_WRITE_NODE_SIZES=1`` rewrites this
  frontend's entry; ``XSLIM_MEASURE_TYPES=A,B`` adds types no workflow uses yet).
* For each file in workflows/ the frontend's ``app.loadGraphData`` must raise no alert, no page error, no error
  toast and no dialog other than the missing-models one (which must then name every file with its folder), leave
  no missing or red node, place no node over another, and keep every node inside one group.
* Every widget must hold the value the file gives it after the load (the frontend can add widgets of its own).
* The FLUX workflow's missing-models dialog must offer each file from the URL the workflow carries.
* The CPU demo is queued from the UI (Ctrl+Enter) and its output images must appear in the nodes.

Screenshots go to <repo>/out/browser/workflows-<frontend version> (XSLIM_BROWSER_ARTIFACTS to choose another root);
XSLIM_SAVE_BROWSER_DOCS=docs/comfyui copies the ones the docs show there, each test its own, and every workflow's
picture at fit-to-view to docs/comfyui/<frontend version>/<workflow>.png.
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
SIZES = os.path.join(WORKFLOWS, "layout", "node_sizes.json")
NAMES = sorted(n for n in os.listdir(WORKFLOWS) if n.endswith(".json"))
SIZE_TOLERANCE = 4  # px: font metrics differ a little between machines; a wrong or missing size is far more

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
# the frontend's size of a freshly created node of each type (what a person gets from the node library)
CREATED_SIZES = """(types) => Object.fromEntries(types.map(t => {
    const n = LiteGraph.createNode(t);
    return [t, n ? [Math.round(n.size[0]), Math.round(n.size[1])] : null];
}))"""
# every node's widget values as the frontend holds them after the load (what it would save and send)
WIDGET_VALUES = """() => Object.fromEntries(app.graph._nodes.map(n => [n.id, n.serialize().widgets_values ?? []]))"""
# the widest line of a text preview's table (the text before its first blank line) and the room its box has; the
# box is found by the table's own first line (the pack's text), whatever element the frontend draws it in
TABLE_FIT = """(header) => {
    const box = [...document.querySelectorAll('textarea')].find(e => e.offsetParent !== null && e.value.startsWith(header));
    if (!box) return null;
    const style = getComputedStyle(box), ctx = document.createElement('canvas').getContext('2d');
    ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const lines = box.value.split('\\n\\n')[0].split('\\n');
    return {lines: lines.length, widest: Math.max(...lines.map(l => ctx.measureText(l).width)),
            room: box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)};
}"""
# every open workflow tab but the active one, closed (the tab strip of a screenshot shows the one workflow)
CLOSE_OTHER_TABS = """async () => {
    const store = app.extensionManager.workflow;
    for (const w of [...store.openWorkflows]) if (!store.isActive(w)) await store.closeWorkflow(w);
    return store.openWorkflows.length;
}"""

# the frontend's own Fit View (the "." key), through its command registry where it has one
FIT_VIEW = """async () => {
    const setting = app.extensionManager && app.extensionManager.setting;  // newer frontends' right panel (its
    if (setting && setting.get('Comfy.RightSidePanel.IsOpen')) await setting.set('Comfy.RightSidePanel.IsOpen', false);  // list
    const command = app.extensionManager && app.extensionManager.command;  // of missing models) off the picture
    if (command) await command.execute('Comfy.Canvas.FitView');
    else app.canvas.ds.reset();
    app.canvas.setDirty(true, true);
}"""


def overlaps(boxes: list[dict], pad: float = 0.0) -> list[tuple]:
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] - pad and b["x"] < a["x"] + a["w"] - pad and a["y"] < b["y"] + b["h"] - pad and b["y"] < a["y"] + a["h"] - pad:
                found.append((a.get("title") or a.get("type"), b.get("title") or b.get("type")))
    return found


def outside_groups(nodes: list[dict], groups: list[dict]) -> list[str]:
    """Nodes not wholly inside exactly one group, and nodes that reach into a group they are not inside."""
    def inside(n, g):
        return g["x"] <= n["x"] and n["x"] + n["w"] <= g["x"] + g["w"] and g["y"] <= n["y"] and n["y"] + n["h"] <= g["y"] + g["h"]

    found = []
    for n in nodes:
        homes = [g["title"] for g in groups if inside(n, g)]
        touched = [g["title"] for g in groups if overlaps([n, g]) and not inside(n, g)]
        if len(homes) != 1 or touched:
            found.append(f"{n['title'] or n['type']} (inside {homes}, reaching into {touched})")
    return found


def expected_models(workflow: dict) -> list[dict]:
    return [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])]


def read(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name)) as f:
        return json.load(f)


def types_to_measure() -> list[str]:
    """Every node type a shipped workflow uses, every type the generators know, and any named in
    XSLIM_MEASURE_TYPES (a new type is measured before a generator can place it)."""
    import build_train_workflows  # noqa: F401  (adds the training types to the shared socket table)
    from build_workflows import SOCKETS

    used = {n["type"] for name in NAMES for n in read(name)["nodes"]}
    extra = {t.strip() for t in os.environ.get("XSLIM_MEASURE_TYPES", "").split(",") if t.strip()}
    return sorted(used | set(SOCKETS) | extra)


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
def shots(page):
    return browser_env.artifacts_dir(f"workflows-{browser_env.frontend_version(page)}")  # one folder per frontend


def load(page, workflow: dict, name: str) -> dict:
    """Load through the frontend as the Templates browser does; what the person then sees."""
    page.xslim_dialogs.clear()
    page.xslim_errors.clear()
    page.evaluate("([data, name]) => app.loadGraphData(data, true, true, name)", [workflow, name])
    page.wait_for_timeout(800)  # dialogs and toasts open asynchronously after the load resolves
    return {"state": page.evaluate(GRAPH_STATE), "dialogs": page.evaluate(browser_env.VISIBLE_DIALOGS),
            "toasts": page.evaluate(browser_env.VISIBLE_ALERTS),
            "alerts": list(page.xslim_dialogs), "errors": list(page.xslim_errors)}


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.evaluate(browser_env.VISIBLE_DIALOGS):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def to_docs(shots: str, pairs: list[tuple[str, str]]) -> None:
    """XSLIM_SAVE_BROWSER_DOCS=<folder>: copy this test's own screenshots there (no test relies on another's)."""
    target = os.environ.get("XSLIM_SAVE_BROWSER_DOCS")
    for shot, doc in pairs if target else []:
        shutil.copyfile(os.path.join(shots, shot), os.path.join(target, doc))


def test_node_sizes_used_for_the_layout_are_the_frontends_own(page):
    """node_sizes.json holds each tested frontend's sizes (the generators lay out with the larger of each); this
    frontend's entry must be its own."""
    types = types_to_measure()
    measured = page.evaluate(CREATED_SIZES, types)
    unknown = sorted(t for t, size in measured.items() if size is None)
    assert not unknown, f"the frontend has no node type {unknown}"
    version = browser_env.frontend_version(page)
    with open(SIZES) as f:
        per_frontend = json.load(f)
    recorded = per_frontend.get(version, {})
    if os.environ.get("XSLIM_WRITE_NODE_SIZES") == "1":
        per_frontend[version] = recorded = {**recorded, **measured}
        with open(SIZES, "w") as f:  # one type a line, as the file is read in review
            f.write("{\n" + ",\n".join(
                f' "{v}": {{\n' + ",\n".join(f'  "{t}": [{w}, {h}]' for t, (w, h) in sorted(sizes.items())) + "\n }"
                for v, sizes in sorted(per_frontend.items())) + "\n}\n")
        print(f"wrote {len(measured)} sizes measured in frontend {version} to {SIZES}; regenerate the workflows (workflows/README.md)")
    wrong = {t: (recorded.get(t), size) for t, size in measured.items()
             if t not in recorded or max(abs(a - b) for a, b in zip(recorded[t], size)) > SIZE_TOLERANCE}
    assert not wrong, (f"node_sizes.json differs from frontend {version} (type: (file, frontend)): {wrong}; rerun with "
                       "XSLIM_WRITE_NODE_SIZES=1, then regenerate the workflows")


def files_this_server_lacks(node: dict, object_info: dict) -> set[str]:
    """The model files a node's widgets name that this server does not list (the big models, a student a run
    has not made yet): a newer frontend marks such a node, which is the mark a person should see."""
    options = {o for spec in object_info.get(node["type"], {}).get("input", {}).get("required", {}).values()
               if isinstance(spec, list) and spec and isinstance(spec[0], list) for o in spec[0]}
    options |= {o for spec in object_info.get(node["type"], {}).get("input", {}).get("required", {}).values()
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict) for o in spec[1].get("options", [])}
    return {v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(".safetensors") and v not in options}


def test_every_workflow_loads_in_the_frontend_without_alerts_missing_red_or_overlapping_nodes(page, srv, shots):
    problems, report = [], []
    start = time.perf_counter()
    for name in NAMES:
        workflow = read(name)
        seen = load(page, workflow, name)
        nodes, groups = seen["state"]["nodes"], seen["state"]["groups"]
        models = expected_models(workflow)
        dialogs, alerts = seen["dialogs"], seen["toasts"]
        if models:  # the files are not on this machine: what the frontend shows about them must name each one
            text = browser_env.missing_models_text(page)
            for m in models:
                if m["name"] not in text or m["directory"] not in text:
                    problems.append(f"{name}: the missing-models notice does not name {m['directory']}/{m['name']}: {text[:300]!r}")
            dialogs = [d for d in dialogs if not all(m["name"] in d for m in models)]
            alerts = []  # the notice that files are missing (newer frontends), checked above through its details
        lacking = {str(n["id"]): files_this_server_lacks(n, srv.object_info) for n in workflow["nodes"]}
        problems += [f"{name}: alert {a!r}" for a in seen["alerts"]]
        problems += [f"{name}: page error {e[:300]!r}" for e in seen["errors"]]
        problems += [f"{name}: dialog {d[:200]!r}" for d in dialogs]
        problems += [f"{name}: toast {t[:200]!r}" for t in alerts]
        problems += [f"{name}: missing node type {n['type']}" for n in nodes if not n["registered"]]
        problems += [f"{name}: red node {n['type']}" for n in nodes if (n["errors"] or n["red"]) and not lacking.get(str(n["id"]))]
        problems += [f"{name}: nodes overlap: {a} / {b}" for a, b in overlaps(nodes)]
        problems += [f"{name}: groups overlap: {a} / {b}" for a, b in overlaps(groups)]
        problems += [f"{name}: node not inside its group: {n}" for n in outside_groups(nodes, groups)]
        assert len(nodes) == len(workflow["nodes"]), f"{name}: {len(nodes)} nodes on the canvas, {len(workflow['nodes'])} in the file"
        assert len(groups) == len(workflow["groups"]) > 1, f"{name}: {len(groups)} groups on the canvas"
        assert any(n["type"] == "MarkdownNote" for n in nodes), f"{name}: no note saying what the workflow does"
        report.append(f"{name}: {len(nodes)} nodes, {len(groups)} groups, {len(models)} model files, "
                      f"{len(seen['alerts']) + len(dialogs) + len(alerts) + len(seen['errors'])} alerts/dialogs/toasts/errors, "
                      f"{len(overlaps(nodes))} overlaps")
        close_dialogs(page)
        page.evaluate(FIT_VIEW)  # the whole workflow in the 1600x1000 window, as the frontend's Fit View shows it
        page.wait_for_timeout(300)  # the canvas draws the new view at its next frame
        page.screenshot(path=os.path.join(shots, name[:-5] + ".png"))
    browser_env.save_docs(page, shots, [name[:-5] + ".png" for name in NAMES])  # <folder>/<frontend version>/
    print(f"frontend {browser_env.frontend_version(page)}:\n" + "\n".join(report), f"\nloaded {len(NAMES)} workflows in {time.perf_counter() - start:.1f} s")
    assert not problems, "\n".join(problems)


# The frontend gives every INT input named "seed" a "control after generate" widget unless the node says otherwise
# (1.x-Distill Train's seed says False: a training run is not re-rolled per queue); a node that forgets it has every
# value after its seed slid one widget along, which this test catches.
def newer_widget_defaults(node_type: str, count: int, object_info: dict) -> list | None:
    """The defaults of the last ``count`` optional widgets of a node type: what a frontend appends for widgets a
    host added after the workflow was written (0.28's CreateVideo.bit_depth)."""
    spec = object_info.get(node_type, {})
    optional = spec.get("input", {}).get("optional", {})
    widgets = [n for n in spec.get("input_order", {}).get("optional", [])
               if isinstance(optional[n][0], list) or optional[n][0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
    if count > len(widgets):
        return None
    return [(optional[n][1] if len(optional[n]) > 1 else {}).get("default") for n in widgets[len(widgets) - count:]]


@pytest.mark.parametrize("name", NAMES)
def test_every_widget_keeps_the_value_the_file_gives_it(page, srv, name):
    workflow = read(name)
    load(page, workflow, name)
    close_dialogs(page)
    held = page.evaluate(WIDGET_VALUES)
    moved = {}
    for n in workflow["nodes"]:
        given, kept = n.get("widgets_values", []), held[str(n["id"])]
        extra = kept[len(given):] if isinstance(given, list) and isinstance(kept, list) else None
        if kept == given or (extra and kept[:len(given)] == given and extra == newer_widget_defaults(n["type"], len(extra), srv.object_info)):
            continue
        moved[f"{n['type']} #{n['id']}"] = (given, kept)
    assert not moved, f"{name}: (file, frontend) widget values differ: {moved}"


def test_the_flux_workflow_without_its_models_opens_the_missing_models_dialog_naming_file_folder_and_source(page, shots):
    workflow = read("xslim_flux_dev.json")
    page.evaluate(CLOSE_OTHER_TABS)
    page.xslim_external.clear()
    seen = load(page, workflow, "xslim_flux_dev.json")
    page.wait_for_timeout(700)  # the dialog sizes each download (a HEAD request) once it is shown
    text = browser_env.missing_models_text(page)
    page.wait_for_timeout(700)
    page.evaluate(CLOSE_OTHER_TABS)  # the tab strip of the picture shows this one workflow
    page.screenshot(path=os.path.join(shots, "missing_models_dialog.png"))
    models = expected_models(workflow)
    assert len(models) == 4 and not seen["alerts"] and not seen["errors"], seen
    for m in models:
        assert m["name"] in text and m["directory"] in text, (m, text)
    # where each file comes from: the frontend asked each of the workflow's URLs for the file's size before offering
    # its download (browser_env refuses the request, as an offline machine would) - so the download points there
    asked = {url for method, url in page.xslim_external if method == "HEAD"}
    for m in models:
        assert m["url"] in asked, (m["url"], page.xslim_external)
    for refusal in ("not allowed", "Only allowed suffixes", "Invalid directory"):
        assert refusal not in text, text
    close_dialogs(page)
    page.screenshot(path=os.path.join(shots, "xslim_flux_dev_clean.png"))
    to_docs(shots, [("missing_models_dialog.png", "browser_missing_models.png"), ("xslim_flux_dev_clean.png", "browser_flux_workflow.png")])


def test_the_cpu_demo_runs_from_the_ui_and_its_images_appear(page, srv, shots):
    workflow = read("xslim_demo_cpu.json")
    seen = load(page, workflow, "xslim_demo_cpu.json")
    assert not seen["alerts"] and not seen["dialogs"] and not seen["errors"], seen
    assert page.evaluate(CLOSE_OTHER_TABS) == 1
    page.mouse.click(800, 950)  # focus the canvas (an empty spot), then the Run shortcut
    start = time.perf_counter()
    page.keyboard.press("Control+Enter")
    image_nodes = [n["id"] for n in workflow["nodes"] if n["type"] in ("SaveImage", "PreviewImage")]
    shown = """(ids) => ids.every(id => { const n = app.graph.getNodeById(id);
        return n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0); })"""
    # about 1 min on a quiet CPU; X-Slim Compare samples 50 steps six times, which on a shared 2-core machine has
    # taken over 7 min. So the wait follows the server, not a clock: it lasts while ComfyUI runs the prompt, and
    # once the prompt has left the queue the images get a minute to arrive
    def queued() -> bool:
        queue = srv.get("/queue")
        return bool(queue["queue_running"] or queue["queue_pending"])

    for _ in range(600):  # the frontend sends the prompt at once; two minutes is a generous bound for that alone
        if queued() or srv.get("/history"):
            break
        page.wait_for_timeout(200)
    else:
        pytest.fail("Ctrl+Enter queued nothing: the frontend did not send the workflow")
    while not page.evaluate(shown, image_nodes):
        srv.assert_alive()
        assert not page.xslim_errors and not page.xslim_dialogs, (page.xslim_errors, page.xslim_dialogs)
        if not queued():
            history = srv.get("/history")
            failed = [h["status"] for h in history.values() if h["status"].get("status_str") == "error"]
            assert not failed, failed
            page.wait_for_function(shown, arg=image_nodes, timeout=60_000, polling=500)
            break
        page.wait_for_timeout(1000)
    seconds = time.perf_counter() - start
    page.wait_for_timeout(1500)  # the last previews draw
    state = page.evaluate(GRAPH_STATE)
    texts = page.evaluate("""() => app.graph._nodes.filter(n => n.type === 'PreviewAny')
        .map(n => (n.widgets || []).map(w => String(w.value ?? '')).join('\\n'))""")
    fit = page.evaluate(TABLE_FIT, "setting")  # X-Slim Compare's table begins with its header's first cell
    page.screenshot(path=os.path.join(shots, "demo_after_run.png"))
    print(f"demo workflow from the UI: images after {seconds:.1f} s")
    assert not overlaps(state["nodes"]), overlaps(state["nodes"])
    assert not outside_groups(state["nodes"], state["groups"]), outside_groups(state["nodes"], state["groups"])
    assert not page.xslim_dialogs and not page.xslim_errors, (page.xslim_dialogs, page.xslim_errors)
    assert any("effective NFE" in t for t in texts), texts
    # X-Slim Compare's aligned table is not wrapped by its preview box (measured in the box's own font)
    assert fit and fit["lines"] >= 7 and fit["widest"] <= fit["room"], fit
    to_docs(shots, [("demo_after_run.png", "browser_demo_after_run.png")])
