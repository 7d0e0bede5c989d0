"""The jobs panel's routes of a real ComfyUI against hostile and damaged run folders (second round): no route
serves a file outside the run's own previews (links, `..`, absolute paths, encodings), every answer is JSON a
browser parses (no NaN), and one damaged run folder shows as that job's error while the others stay listed."""

from __future__ import annotations

import json
import os

import pytest

from server_env import Server, make_base

CLEAR = pytest.mark.bad_input("clear error")
SURVIVED = pytest.mark.bad_input("survived")
SECRET = b"root:x:0:0:the machine's own file"


def raw(srv, path: str) -> tuple[int, bytes, str]:
    """(status, body bytes, content type) of a GET, the body unparsed (as a browser receives it)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(srv.url + path, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def strict_json(body: bytes):
    """What a browser's JSON.parse accepts: NaN and Infinity are refused."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(body, parse_constant=refuse)


def run_folder(root: str, name: str, job: dict | None = None, **files) -> str:
    run = os.path.join(root, name)
    os.makedirs(os.path.join(run, "previews"), exist_ok=True)
    with open(os.path.join(run, "job.json"), "w") as f:
        json.dump(job or {"format": "xslim-distill-job/1", "config": {"iterations": 10}, "base": {"name": "m"}}, f)
    for fname, text in files.items():
        with open(os.path.join(run, fname), "w") as f:
            f.write(text)
    return run


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    make_base(base)
    root = os.path.join(str(base), "user", "xslim", "distill")
    secret = os.path.join(str(base), "secret.txt")
    with open(secret, "wb") as f:
        f.write(SECRET)
    run = run_folder(root, "linked")
    with open(os.path.join(run, "previews", "00010.png"), "wb") as f:
        f.write(b"\x89PNG the run's own preview")
    os.symlink(secret, os.path.join(run, "previews", "99999.png"))
    os.symlink(secret, os.path.join(run, "previews", "100000.png"))
    run_folder(root, "nan", **{"metrics.jsonl": '{"iteration": 4, "loss_student": NaN, "eta_s": Infinity}\n'})
    run_folder(root, "garbled", **{"heartbeat.json": '{"time": "x", "iteration": "y", "phase": 3}',
                                   "status.json": "[" * 100000 + "]" * 100000})
    run_folder(root, "weird", job={"config": {"iterations": "ten"}, "base": ["not", "a", "dict"]})
    server = Server(base).start()
    server.secret = secret
    yield server
    server.stop()


@SURVIVED
def test_a_link_in_the_previews_folder_is_never_served(srv):
    status, body, ctype = raw(srv, "/xslim/jobs/linked/preview.png")
    assert status == 200 and body == b"\x89PNG the run's own preview" and ctype == "image/png"
    assert srv.get("/xslim/jobs/linked")["preview"] == 10


@CLEAR
@pytest.mark.parametrize("name", ["..", "../linked", "%2e%2e", "%2e%2e%2flinked", "..%2f..%2fsecret.txt", "%2Fetc%2Fpasswd",
                                  "linked%00", "linked%2fpreviews", "%252e%252e", ".hidden", "a" * 300])
def test_no_route_reads_outside_the_jobs_folder(srv, name):
    for route in ("", "/preview.png", "/loss.png"):
        status, body, ctype = raw(srv, f"/xslim/jobs/{name}{route}")
        assert SECRET not in body
        assert status in (400, 404), (name, route, status, body[:200])
        if "json" in ctype:
            assert "error" in strict_json(body)


@SURVIVED
def test_the_job_list_is_json_a_browser_parses_and_one_damaged_folder_hides_no_other_job(srv):
    status, body, _ = raw(srv, "/xslim/jobs")
    assert status == 200
    jobs = {j["name"]: j for j in strict_json(body)["jobs"]}
    assert set(jobs) == {"linked", "nan", "garbled", "weird"}
    assert jobs["nan"]["iteration"] == 4 and jobs["nan"]["losses"] == {"loss_student": None}
    assert jobs["weird"]["iterations"] is None and jobs["weird"]["model"] is None
    for name in jobs:
        status, body, _ = raw(srv, f"/xslim/jobs/{name}")
        assert status == 200 and strict_json(body)["name"] == name
    log = open(srv.log_path).read()  # (ComfyUI logs tracebacks of its own, e.g. a missing torchaudio)
    assert "1.x-Distill jobs route" not in log and "1.x-Distill jobs monitor" not in log  # no route or monitor failure
