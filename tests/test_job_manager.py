"""The ComfyUI job manager (nodes/jobs.py) without ComfyUI: a resume with other prompts, another text encoder or
another base file is refused naming the change; ComfyUI's memory is freed only just before a worker starts; a
worker that ignores its stop file is terminated (SIGTERM, then SIGKILL) and the job ends failed; a student file
that appeared during training is kept and the export takes the next free name."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distill_core import jobfiles as jf
from pack import node_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "comfyui_xslim_jobs_test"


jobs = node_module("jobs", PACK)


@pytest.fixture()
def manager(tmp_path, monkeypatch):
    students = tmp_path / "students"
    students.mkdir()
    monkeypatch.setattr(jobs, "students_dir", lambda: str(students))
    m = jobs.JobManager(root=str(tmp_path / "jobs"))
    yield m
    m.stop_monitor()


@pytest.fixture()
def no_worker(monkeypatch):
    """Record what would start instead of starting a worker process."""
    calls = []
    monkeypatch.setattr(jobs.JobManager, "_spawn", lambda self, job, devices: calls.append("spawn"))
    return calls


CONFIG = {"stage": "stage1", "teacher": "/models/sd3.safetensors", "iterations": 10, "batch_size": 1, "prompts": jf.CONDITIONING,
          "stage1": {"lr_student": 4e-5, "cache_first": 14, "cache_last": 22}}
GPU = {"mode": "exclusive", "device": "cpu"}


def text_base(**change) -> dict:
    return {"name": "sd3.safetensors", "family": "sd3", "size": 1000, "prompt_list": "aaaa", "text_encoder": "cccc", **change}


def test_a_resume_with_other_prompts_or_another_clip_is_refused_naming_the_prompts(manager, no_worker):
    written = []
    summary, what = manager.submit("text", text_base(), CONFIG, GPU, write_extra=lambda d: written.append(d))
    assert what == "started" and len(written) == 1 and no_worker == ["spawn"]
    for change, expected in [({"prompt_list": "bbbb"}, "prompts: the prompt list changed (hash aaaa -> bbbb)"),
                             ({"text_encoder": "dddd"}, "prompts: another text encoder (clip input) encodes them (hash cccc -> dddd)")]:
        with pytest.raises(jobs.JobError) as err:
            manager.submit("text", text_base(**change), CONFIG, GPU, write_extra=lambda d: written.append(d))
        assert err.value.status == 409 and expected in str(err.value), str(err.value)
    assert len(written) == 1 and no_worker == ["spawn"]  # refused: the encoded prompts were not rewritten, nothing started
    summary, what = manager.submit("text", text_base(), {**CONFIG, "iterations": 20}, GPU)
    assert what == "resumed" and no_worker == ["spawn", "spawn"]


def test_a_base_file_of_another_size_is_refused_at_once_and_other_contents_are_left_to_the_worker(manager, no_worker):
    manager.submit("sized", text_base(), CONFIG, GPU)
    with pytest.raises(jobs.JobError) as err:
        manager.submit("sized", text_base(name="other.safetensors", size=2000), CONFIG, GPU)
    assert "base model: sd3.safetensors (1000 bytes) -> other.safetensors (2000 bytes)" in str(err.value)
    # same size, other name: only the content hash can tell, which the worker computes (the prompt never reads the file)
    assert manager.submit("sized", text_base(name="other.safetensors"), CONFIG, GPU)[1] == "resumed"


def test_the_resume_route_refuses_a_base_file_of_another_size_and_leaves_other_contents_to_the_worker(manager, no_worker, tmp_path):
    teacher = tmp_path / "sd3.safetensors"
    teacher.write_bytes(b"x" * 1000)
    manager.submit("route", text_base(), {**CONFIG, "teacher": str(teacher)}, GPU)
    teacher.write_bytes(b"y" * 1000)  # rewritten, same size: the worker's hash decides
    assert manager.resume("route")["name"] == "route" and no_worker == ["spawn", "spawn"]
    teacher.write_bytes(b"y" * 1200)
    with pytest.raises(jobs.JobError) as err:
        manager.resume("route")
    assert err.value.status == 409 and "changed on disk (1000 bytes when the job started, 1200 now)" in str(err.value)
    assert no_worker == ["spawn", "spawn"]


def test_comfyuis_memory_is_freed_after_the_prompts_are_encoded_and_only_when_a_worker_starts(manager, no_worker):
    order = []
    manager.submit("order", text_base(), CONFIG, GPU, write_extra=lambda d: order.append("encode"),
                   before_start=lambda: order.append("unload"))
    assert order + no_worker[-1:] == ["encode", "unload", "spawn"]
    with pytest.raises(jobs.JobError):  # refused: nothing unloaded
        manager.submit("order", text_base(prompt_list="bbbb"), CONFIG, GPU, before_start=lambda: order.append("unload"))
    jf.write_json(os.path.join(manager.root, "order", jf.STATUS), {"state": "done", "iteration": 10})
    open(os.path.join(manager.root, "order", jf.STUDENT), "wb").close()
    assert manager.submit("order", text_base(), CONFIG, GPU, before_start=lambda: order.append("unload"))[1] == \
        "finished earlier; nothing to train"
    assert order == ["encode", "unload"]
    manager.submit("order", text_base(), {**CONFIG, "iterations": 20}, GPU, before_start=lambda: order.append("unload"))
    assert order == ["encode", "unload", "unload"] and no_worker == ["spawn", "spawn"]


def test_the_jobs_api_flag_is_false_outside_comfyui():
    assert jobs.comfy_jobs_api() is False


# -- a worker that ignores its stop file ---------------------------------------------------------------------
STUBBORN = """
import signal, sys, time
def term(*_):
    open(sys.argv[1], "w").write("SIGTERM")  # noted, and ignored
signal.signal(signal.SIGTERM, term)
open(sys.argv[1] + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


def test_a_worker_that_ignores_the_stop_file_is_terminated_then_killed(manager, monkeypatch, tmp_path):
    monkeypatch.setattr(jobs, "CANCEL_GRACE_S", 0.5)
    monkeypatch.setattr(jobs, "TERMINATE_GRACE_S", 0.5)
    monkeypatch.setattr(jobs, "POLL_S", 0.1)
    run = os.path.join(manager.root, "stubborn")
    os.makedirs(run)
    jf.write_json(os.path.join(run, jf.JOB), {"format": "xslim-distill-job/1", "config": {"iterations": 10}, "base": {}})
    seen = str(tmp_path / "term")
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, seen], start_new_session=True)  # a session, as _spawn makes
    try:
        job = manager.job("stubborn")
        job.proc = proc
        deadline = time.time() + 30
        while not os.path.exists(seen + ".ready") and time.time() < deadline:
            time.sleep(0.05)
        asked = time.time()
        assert manager.cancel("stubborn")["state"] == "stopping" and os.path.exists(os.path.join(run, jf.STOP))
        manager.start_monitor()
        proc.wait(15)
        took = time.time() - asked
        assert open(seen).read() == "SIGTERM" and proc.returncode == -9, proc.returncode  # SIGTERM first, then SIGKILL
        assert 1.0 <= took < 10, took  # after the two grace periods, not at once
        summary = manager.summary(job)
        assert summary["state"] == "stopped" and not summary["can_cancel"] and summary["can_resume"]
        assert "killed by signal 9 (SIGKILL)" in summary["message"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- export -------------------------------------------------------------------------------------------------
def finished_job(manager, name: str, overwrite: bool = False):
    run = os.path.join(manager.root, name)
    os.makedirs(run)
    jf.write_json(os.path.join(run, jf.JOB), {"format": "xslim-distill-job/1", "config": {"iterations": 10}, "base": {},
                                              "export": {"overwrite": overwrite}})
    with open(os.path.join(run, jf.STUDENT), "wb") as f:
        f.write(b"the trained student")
    return manager.job(name)


def test_a_student_file_that_appeared_during_training_is_kept_and_the_export_takes_the_next_free_name(manager):
    folder = jobs.students_dir()
    for taken in ("late.safetensors", "late_2.safetensors"):
        with open(os.path.join(folder, taken), "wb") as f:
            f.write(b"the user's own file")
    job = finished_job(manager, "late")
    assert manager.export(job) == "late_3.safetensors"
    assert all(open(os.path.join(folder, n), "rb").read() == b"the user's own file" for n in ("late.safetensors", "late_2.safetensors"))
    assert open(os.path.join(folder, "late_3.safetensors"), "rb").read() == b"the trained student"
    note = jf.read_json(os.path.join(job.run_dir, "export.json"))["note"]
    assert "late.safetensors appeared meanwhile and was kept; exported as late_3.safetensors" in note
    assert manager.export(job) == "late_3.safetensors"  # once: a second look finds the export done
    assert sorted(os.listdir(folder)) == ["late.safetensors", "late_2.safetensors", "late_3.safetensors"]  # no temp left


def test_overwrite_student_replaces_the_file(manager):
    folder = jobs.students_dir()
    with open(os.path.join(folder, "mine.safetensors"), "wb") as f:
        f.write(b"an earlier student")
    assert manager.export(finished_job(manager, "mine", overwrite=True)) == "mine.safetensors"
    assert open(os.path.join(folder, "mine.safetensors"), "rb").read() == b"the trained student"


def test_job_files_and_exports_never_write_through_a_planted_link(manager, tmp_path):
    """The old temporary names were predictable (status.json.tmp<pid>, .<name>.<pid>.tmp): a link planted under
    one sent the write to wherever it pointed. Both writers now create their temporary files exclusively."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    run = tmp_path / "run"
    run.mkdir()
    for planted in (f"status.json.tmp{os.getpid()}", f".status.json.{os.getpid()}.tmp"):
        os.symlink(outside, run / planted)
    jf.write_json(str(run / "status.json"), {"state": "done"})
    assert jf.read_json(str(run / "status.json")) == {"state": "done"}
    assert oct(os.stat(run / "status.json").st_mode & 0o777) == "0o644"
    folder = jobs.students_dir()
    os.symlink(outside, os.path.join(folder, f".linked.{os.getpid()}.tmp"))
    assert manager.export(finished_job(manager, "linked")) == "linked.safetensors"
    assert open(os.path.join(folder, "linked.safetensors"), "rb").read() == b"the trained student"
    assert outside.read_bytes() == b"not yours"
