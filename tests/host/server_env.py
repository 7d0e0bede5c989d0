"""A real ComfyUI server with the pack, for tests that drive it over HTTP and websockets as the frontend does.

The server loads the pack from a temporary custom_nodes folder (a link to this checkout) given through
``--extra-model-paths-config``, which also adds a temporary ``diffusion_models`` and ``students`` folder;
outputs, inputs, user files and temp files go to the temporary folder too. A server can be stopped and started
again on the same folder (a ComfyUI restart).
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frontend_args() -> list[str]:
    """The frontend to serve: $XSLIM_FRONTEND_ROOT (another frontend package's static folder, through ComfyUI's
    own --front-end-root; `make test` sets it to the newest frontend on the 0.28 host), else the host's own."""
    root = os.environ.get("XSLIM_FRONTEND_ROOT")
    if not root:
        return []
    if not os.path.isfile(os.path.join(root, "index.html")):
        pytest.fail(f"XSLIM_FRONTEND_ROOT={root} holds no frontend (no index.html): `make test` installs it")
    return ["--front-end-root", root]


def make_base(base) -> str:
    """The folder layout one server (or a server and its restart) runs on."""
    for sub in ("custom_nodes", "output", "input", "user", "temp", "models/diffusion_models", "models/students"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    link = os.path.join(base, "custom_nodes", "comfyui-xslim")
    if not os.path.islink(link):
        os.symlink(ce.REPO, link)
    with open(os.path.join(base, "paths.yaml"), "w") as f:
        f.write(f"xslim_tests:\n  base_path: {base}\n  custom_nodes: custom_nodes\n"
                "  diffusion_models: models/diffusion_models\n  students: models/students\n")
    return str(base)


class Server:
    def __init__(self, base, env: dict | None = None):
        self.base, self.url, self.proc, self.object_info = str(base), None, None, None
        self.env = env or {}
        self.log_path = os.path.join(self.base, "server.log")

    def start(self, timeout: float = 180) -> "Server":
        port = free_port()
        base = self.base
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
             "--extra-model-paths-config", os.path.join(base, "paths.yaml"), "--output-directory", os.path.join(base, "output"),
             "--input-directory", os.path.join(base, "input"), "--user-directory", os.path.join(base, "user"),
             "--temp-directory", os.path.join(base, "temp"), *frontend_args()],
            cwd=ce.COMFY, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while True:
            try:
                self.object_info = self.get("/object_info")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    pytest.fail("ComfyUI did not start:\n" + open(self.log_path).read()[-3000:])
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.proc = None

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30):
        """(status, parsed JSON or raw bytes, content type), also for error statuses."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, (json.loads(data) if "json" in ctype else data), ctype

    def post(self, path: str, payload: dict):
        status, data, _ = self.request("POST", path, json.dumps(payload).encode())
        return status, data

    def queue(self, prompt: dict, client_id: str = "xslim-tests") -> str:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, answer
        return answer["prompt_id"]

    def in_queue(self, prompt_id: str) -> bool:
        """Whether ComfyUI still holds the prompt: running, or pending behind others."""
        queue = self.get("/queue")
        return any(item[1] == prompt_id for item in queue.get("queue_running", []) + queue.get("queue_pending", []))

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"ComfyUI exited ({self.proc.returncode}):\n" + open(self.log_path).read()[-3000:])

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The prompt's history entry once it ends. The wait follows the server, not a clock: it goes on while
        ComfyUI is alive and holds the prompt (a busy machine only makes it longer); ``timeout`` counts only the
        time the prompt is neither in the queue nor in the history (lost)."""
        lost_since = None
        while True:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                if history[prompt_id]["status"]["status_str"] in ("success", "error"):
                    return history[prompt_id]
            self.assert_alive()
            if self.in_queue(prompt_id):
                lost_since = None
            elif prompt_id not in history:
                lost_since = lost_since or time.time()
                if time.time() - lost_since > timeout:
                    raise TimeoutError(f"prompt {prompt_id} is neither queued nor in the history ({timeout} s)")
            time.sleep(0.25)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(make_base(tmp_path_factory.mktemp("comfy"))).start()
    yield srv
    srv.stop()
