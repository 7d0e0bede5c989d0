"""The pack inside a real ComfyUI server, driven over its HTTP API as the frontend and scripts drive it.

The server loads the pack from a temporary custom_nodes folder (a link to this checkout) given through
``--extra-model-paths-config``; outputs, user files and temp files go to a temporary folder too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import comfy_env as ce

WORKFLOWS = os.path.join(ce.REPO, "workflows")
MODEL_FILE = (".safetensors", ".sft", ".ckpt", ".pt", ".gguf")
CONTROL = {"fixed", "increment", "decrement", "randomize"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str):
        self.url = None
        self.base = base

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": "xslim-tests"})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    for sub in ("custom_nodes", "output", "input", "user", "temp"):
        (base / sub).mkdir()
    os.symlink(ce.REPO, base / "custom_nodes" / "comfyui-xslim")
    (base / "paths.yaml").write_text(f"xslim_tests:\n  base_path: {base}\n  custom_nodes: custom_nodes\n")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--extra-model-paths-config", str(base / "paths.yaml"), "--output-directory", str(base / "output"),
         "--input-directory", str(base / "input"), "--user-directory", str(base / "user"), "--temp-directory", str(base / "temp")],
        cwd=ce.COMFY, stdout=log, stderr=subprocess.STDOUT,
    )
    srv = Server(str(base))
    srv.url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            srv.object_info = srv.get("/object_info")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-3000:])
            time.sleep(1)
    yield srv
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _check_widget(node_type: str, name: str, kind, conf: dict, value) -> None:
    where = f"{node_type}.{name} = {value!r}"
    options = kind if isinstance(kind, list) else conf.get("options") if kind == "COMBO" else None
    if options is not None:
        # loaders list the files this machine has; the big models' files are not here
        is_missing_model_file = isinstance(value, str) and value.endswith(MODEL_FILE) and name.endswith(("_name", "_name1", "_name2", "_name3"))
        assert value in options or is_missing_model_file, f"{where}: not one of {options}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    if kind in ("INT", "FLOAT"):
        assert conf.get("min", value) <= value <= conf.get("max", value), f"{where}: outside [{conf.get('min')}, {conf.get('max')}]"


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow as an API prompt, checking every node type and widget value on the way."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        assert node["type"] in object_info, f"node type {node['type']} is not known to this ComfyUI"
        spec = object_info[node["type"]]
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        order = spec["input_order"].get("required", []) + spec["input_order"].get("optional", [])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values, inputs = list(node.get("widgets_values", [])), {}
        for name in order:
            kind, conf = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {}) or {}
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
                continue
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                assert name in spec["input_order"].get("optional", []), f"{node['type']}.{name} needs a link"
                continue
            assert values, f"{node['type']}: no widget value left for {name}"
            inputs[name] = values.pop(0)
            _check_widget(node["type"], name, kind, conf, inputs[name])
            if conf.get("control_after_generate"):
                assert values and values.pop(0) in CONTROL, f"{node['type']}.{name}: control_after_generate value missing"
        assert not values, f"{node['type']}: widget values left over {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name)) as f:
        return json.load(f)


def test_the_pack_loads_and_lists_its_nodes_and_workflows(server):
    ours = {name: info for name, info in server.object_info.items() if info["python_module"].startswith("custom_nodes.comfyui-xslim")}
    assert set(ours) == {"XSlimCache", "XSlimStats", "XSlimProfile", "XSlimCompare", "XSlimDemoClass", "XSlimDemoDecode"}
    assert all(info["category"].startswith("X-Slim") and info["description"] for info in ours.values())
    cache_inputs = ours["XSlimCache"]["input"]["required"]
    assert "demo_teacher" in cache_inputs["profile"][1]["options"]  # the shipped profile
    assert all("tooltip" in cache_inputs[k][1] for k in cache_inputs if k != "model")
    templates = server.get("/api/workflow_templates")
    assert set(templates["comfyui-xslim"]) >= {name[:-5] for name in os.listdir(WORKFLOWS) if name.endswith(".json")}


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(WORKFLOWS) if n.endswith(".json")))
def test_every_workflow_fits_the_servers_object_info(server, name):
    prompt = ui_to_api(load_workflow(name), server.object_info)
    types = {n["class_type"] for n in prompt.values()}
    assert "XSlimCache" in types or "XSlimCompare" in types


def test_the_demo_workflow_runs_over_http_and_produces_the_comparison_grid(server):
    prompt = ui_to_api(load_workflow("xslim_demo_cpu.json"), server.object_info)
    result = server.run(prompt)
    assert result["status"]["status_str"] == "success", result["status"]["messages"]
    saved = {n: out["images"] for n, out in result["outputs"].items() if "images" in out}
    grid_node = next(n for n, p in prompt.items() if p["class_type"] == "SaveImage" and p["inputs"]["filename_prefix"] == "xslim_demo_compare")
    grid = saved[grid_node][0]
    png = server.get(f"/view?filename={grid['filename']}&subfolder={grid['subfolder']}&type=output")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = next(out["text"] for out in result["outputs"].values() if "text" in out and "| setting |" in str(out["text"]))
    rows = [line for line in "".join(table).splitlines() if line.startswith("| ") and "setting" not in line]
    assert len(rows) == 5 and rows[0].startswith("| uncached | 50.0 | 1.00x |") and "| 1.00x | 100.00 |" in rows[0]
    target = os.environ.get("XSLIM_SAVE_DEMO_GRID")
    if target:  # how docs/comfyui/ gets its picture: the grid this very test produced
        with open(target, "wb") as f:
            f.write(png)
        with open(os.path.splitext(target)[0] + ".md", "w") as f:
            f.write("".join(table) + "\n")
        stats_preview = next(n for n, p in prompt.items() if p["class_type"] == "PreviewImage")
        decisions = saved[stats_preview][0]
        with open(os.path.join(os.path.dirname(target), "decision_map.png"), "wb") as f:
            f.write(server.get(f"/view?filename={decisions['filename']}&subfolder={decisions['subfolder']}&type={decisions['type']}"))


def test_thresholds_in_the_wrong_order_reach_the_error_dialog_and_the_graph_without_the_node_runs(server):
    prompt = ui_to_api(load_workflow("xslim_demo_cpu.json"), server.object_info)
    cache_id = next(n for n, p in prompt.items() if p["class_type"] == "XSlimCache")
    for n in [n for n, p in prompt.items() if p["class_type"] in ("XSlimCompare", "XSlimStats", "PreviewImage", "PreviewAny")]:
        del prompt[n]
    prompt[cache_id]["inputs"].update(preset="custom", early_warning=0.5, critical=0.1)
    result = server.run(prompt)
    assert result["status"]["status_str"] == "error"
    error = next(m[1] for m in result["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "XSlimCache" and "below the early-warning threshold" in error["exception_message"]
    sampler = next(n for n, p in prompt.items() if p["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["model"] = prompt[cache_id]["inputs"]["model"]
    del prompt[cache_id]
    assert server.run(prompt)["status"]["status_str"] == "success"
