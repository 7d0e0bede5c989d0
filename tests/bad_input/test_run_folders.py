"""Hostile or damaged run folders against what the jobs panel reads (``distill_core/jobfiles.py`` and the job
manager of ``nodes/jobs.py``, without ComfyUI): links and stray files never served as previews, no NaN in what a
route sends, one damaged folder shown as that job's error while the others stay listed, bounded reads, idempotent
cancel, an extended run exported under the name the user gave, stale checkpoint temporaries removed."""

from __future__ import annotations

import json
import os

import pytest

from distill_core import jobfiles as jf
from test_job_manager import finished_job, jobs, manager  # noqa: F401  (manager: the job manager fixture)

CLEAR = pytest.mark.bad_input("clear error")
SURVIVED = pytest.mark.bad_input("survived")


def run_folder(manager, name: str, **files) -> str:
    run = os.path.join(manager.root, name)
    os.makedirs(os.path.join(run, jf.PREVIEWS))
    jf.write_json(os.path.join(run, jf.JOB), {"format": "xslim-distill-job/1", "config": {"iterations": 10}, "base": {"name": "m"}})
    for fname, text in files.items():
        with open(os.path.join(run, fname.replace("__", ".")), "w") as f:
            f.write(text)
    return run


# -- previews: only the run's own images --------------------------------------------------------------------
@SURVIVED
def test_a_link_in_the_previews_folder_is_never_the_preview(manager, tmp_path):
    run = run_folder(manager, "linked")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    with open(os.path.join(run, jf.PREVIEWS, "00010.png"), "wb") as f:
        f.write(b"\x89PNG real")
    os.symlink(secret, os.path.join(run, jf.PREVIEWS, "99999.png"))  # the highest number: what would be served
    os.symlink("/etc/passwd", os.path.join(run, jf.PREVIEWS, "100000.png"))
    os.makedirs(os.path.join(run, jf.PREVIEWS, "200000.png"))  # a folder under a preview's name
    path = jf.latest_preview(run)
    assert os.path.basename(path) == "00010.png" and jf.read_preview(path) == b"\x89PNG real"


@CLEAR
def test_a_preview_swapped_for_a_link_after_the_look_is_refused(manager, tmp_path):
    run = run_folder(manager, "swapped")
    path = os.path.join(run, jf.PREVIEWS, "00005.png")
    os.symlink("/etc/passwd", path)
    with pytest.raises(OSError):
        jf.read_preview(path)


@SURVIVED
def test_previews_past_iteration_99999_are_found_by_number(manager):
    run = run_folder(manager, "long")
    for it in (99999, 100000, 100005):
        with open(os.path.join(run, jf.PREVIEWS, f"{it:05d}.png"), "wb") as f:
            f.write(b"png")
    assert os.path.basename(jf.latest_preview(run)) == "100005.png"
    assert manager.summary(manager.job("long"))["preview"] == 100005


# -- what a route sends ---------------------------------------------------------------------------------------
@SURVIVED
def test_nan_losses_and_eta_go_out_as_null_json_a_browser_parses(manager):
    run = run_folder(manager, "nan")
    with open(os.path.join(run, jf.METRICS), "w") as f:
        f.write('{"iteration": 3, "loss_student": NaN, "loss_fake": Infinity, "eta_s": -Infinity, "it_per_s": 1.5}\n')
    text = jf.dumps({"jobs": manager.list()})
    assert "NaN" not in text and "Infinity" not in text
    job = json.loads(text)["jobs"][0]
    assert job["iteration"] == 3 and job["losses"] == {"loss_student": None, "loss_fake": None}


@SURVIVED
@pytest.mark.parametrize("fname,text", [
    ("heartbeat.json", '{"time": "soon", "iteration": "three", "phase": 5}'),
    ("status.json", '{"state": ["done"], "iteration": {}}'),
    ("job.json", '{"format": 1, "config": [10], "base": "m"}'),
    ("job.json", '{"config": {"iterations": "ten"}, "base": {}}'),
    ("status.json", "[" * 100000 + "]" * 100000),  # RecursionError in json
    ("heartbeat.json", "{" + '"x": 1,' * 200000 + '"y": 2}'),  # over the size bound
    ("metrics.jsonl", '{"iteration": "7"}\n[1, 2]\n' + "[" * 50000 + "]" * 50000 + "\n"),
])
def test_one_damaged_run_file_never_hides_the_other_jobs(manager, fname, text):
    run_folder(manager, "good")
    run_folder(manager, "bad", **{fname.replace(".", "__"): text})
    listed = {j["name"]: j for j in json.loads(jf.dumps({"jobs": manager.list()}))["jobs"]}
    assert set(listed) == {"good", "bad"} and listed["good"]["state"] == "interrupted"
    bad = listed["bad"]
    assert bad["state"] in ("interrupted", "damaged") and isinstance(bad["iteration"], int)
    if bad["state"] == "damaged":
        assert "cannot be read" in bad["message"] and bad["name"] == "bad"


@CLEAR
def test_a_folder_whose_summary_breaks_is_listed_as_damaged_with_its_reason(manager, monkeypatch):
    run_folder(manager, "good")
    run_folder(manager, "broken")
    real = jobs.jf.latest_preview  # the manager's own copy of the module (the pack is loaded as a package)

    def explode(run_dir):  # a failure nobody foresaw, in one folder only
        if run_dir.endswith("broken"):
            raise OSError("Input/output error")
        return real(run_dir)

    monkeypatch.setattr(jobs.jf, "latest_preview", explode)
    listed = {j["name"]: j for j in manager.list()}
    assert listed["good"]["state"] == "interrupted"
    assert listed["broken"]["state"] == "damaged" and "OSError: Input/output error" in listed["broken"]["message"]
    assert not listed["broken"]["can_resume"] and not listed["broken"]["can_cancel"]


# -- lifecycles -----------------------------------------------------------------------------------------------
@SURVIVED
def test_a_double_click_on_cancel_is_one_request(manager, monkeypatch):
    run_folder(manager, "busy")
    job = manager.job("busy")
    monkeypatch.setattr(manager, "_alive", lambda j: True)
    signals = []
    monkeypatch.setattr(manager, "_terminate", lambda j, sig: signals.append(sig))
    first, second = manager.cancel("busy"), manager.cancel("busy")
    assert first["state"] == second["state"] == "stopping" and not signals  # no escalation without "force"
    assert os.path.exists(os.path.join(job.run_dir, jf.STOP))
    manager.cancel("busy", force=True)
    assert len(signals) == 1


@SURVIVED
def test_training_longer_under_the_same_name_replaces_its_own_export(manager):
    job = finished_job(manager, "grown")
    jf.write_json(job.path(jf.STATUS), {"state": "done", "iteration": 10})
    assert manager.export(job) == "grown.safetensors"
    manager._restart = lambda j, devices: None  # noqa: SLF001  (the run is trained on: no worker here)
    for stale in (jf.STOP, jf.STATUS, jf.HEARTBEAT):
        if os.path.exists(job.path(stale)):
            os.remove(job.path(stale))
    with open(job.path(jf.STUDENT), "wb") as f:
        f.write(b"the student after 20 iterations")
    jf.write_json(job.path(jf.STATUS), {"state": "done", "iteration": 20})
    assert manager.export(job) == "grown.safetensors"
    folder = jobs.students_dir()
    assert sorted(os.listdir(folder)) == ["grown.safetensors"]
    assert open(os.path.join(folder, "grown.safetensors"), "rb").read() == b"the student after 20 iterations"


@SURVIVED
def test_a_killed_checkpoint_write_leaves_no_temporary_once_the_folder_is_opened_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".state.safetensors.abc123.tmp", run / ".student.safetensors.x9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = [run / ".status.json.q1.tmp", run / "notes.tmp"]  # not a checkpoint: never the lock holder's alone
    for p in keep:
        p.write_bytes(b"x")
    lock = jf.RunLock(str(run)).acquire()
    try:
        assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    finally:
        lock.release()
