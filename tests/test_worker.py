"""The background training worker as a real process on a tiny teacher: its run-folder protocol (heartbeat,
previews, final status), a stop request that saves and exits, a resume that ends bit-identical to a run that
never stopped, the folder lock, and a resume refused because the base model or a setting changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from distill_core import jobfiles as jf
from xslim_lab.tiny import write_tiny_teacher
from distill_core.worker import EXIT_BUSY, EXIT_DONE, EXIT_REFUSED, JOB_FORMAT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return write_tiny_teacher(str(folder / "a.safetensors")), write_tiny_teacher(str(folder / "b.safetensors"), seed=1)


def make_job(run_dir, teacher, **config) -> str:
    os.makedirs(run_dir, exist_ok=True)
    cfg = dict(teacher=teacher, iterations=6, batch_size=2, checkpoint_every=2, preview_every=3, threads=1,
               stage1={"lr_student": 1e-3, "lr_fake": 1e-3, "cache_first": 1, "cache_last": 1})
    cfg.update(config)
    jf.write_json(os.path.join(run_dir, jf.JOB), {"format": JOB_FORMAT, "config": cfg, "base": {"name": os.path.basename(teacher)},
                                                  "gpu": {"mode": "exclusive", "device": "cpu"}})
    return str(run_dir)


def start(run_dir) -> subprocess.Popen:
    log = open(os.path.join(run_dir, jf.LOG), "ab")
    return subprocess.Popen([sys.executable, "-m", "distill_core.worker", "--run-dir", str(run_dir)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=120) -> int:
    return proc.wait(timeout)


def wait_for(predicate, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_worker_reports_only_through_its_folder_and_ends_with_a_status(teachers, tmp_path):
    run = make_job(tmp_path / "run", teachers[0])
    proc = start(run)
    wait_for(lambda: os.path.exists(os.path.join(run, jf.HEARTBEAT)), what="the first heartbeat")
    assert jf.is_locked(run) or proc.poll() is not None  # the lock is held while the worker lives
    assert finish(proc) == EXIT_DONE
    status = jf.read_json(os.path.join(run, jf.STATUS))
    assert status["state"] == "done" and status["iteration"] == 6 and status["student"] == jf.STUDENT
    beat = jf.read_json(os.path.join(run, jf.HEARTBEAT))
    assert beat["pid"] == proc.pid and beat["pgid"] == proc.pid and beat["phase"] == "exited" and beat["iteration"] == 6
    assert jf.is_locked(run) is False
    records, _ = jf.read_metrics(os.path.join(run, jf.METRICS))
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(os.path.join(run, jf.PREVIEWS))) == ["00003.png", "00006.png"]
    fingerprint = jf.read_json(os.path.join(run, jf.FINGERPRINT))
    assert fingerprint["base"]["hash"] == jf.content_hash(teachers[0]) and "iterations" not in fingerprint["config"]
    assert "stage2" not in fingerprint["config"]  # the inactive stage's settings do not pin a run
    with safe_open(os.path.join(run, jf.STUDENT), framework="pt") as f:
        assert json.loads(f.metadata()["cached_blocks"]) == [1, 1]


def test_a_stop_request_saves_and_the_resumed_run_ends_bit_identical(teachers, tmp_path):
    run = make_job(tmp_path / "stopped", teachers[0], iterations=400, preview_every=0)
    proc = start(run)
    wait_for(lambda: len(jf.read_metrics(os.path.join(run, jf.METRICS))[0]) >= 3, what="three iterations")
    asked = time.time()
    open(os.path.join(run, jf.STOP), "w").close()
    assert finish(proc, 60) == EXIT_DONE
    took = time.time() - asked
    status = jf.read_json(os.path.join(run, jf.STATUS))
    assert status["state"] == "stopped" and took < 20, (status, took)
    stopped_at = status["iteration"]
    assert not os.path.exists(os.path.join(run, jf.STOP))  # acted on: a resume must not stop at once
    with safe_open(os.path.join(run, jf.STATE), framework="pt") as f:
        assert f.metadata()["iteration"] == str(stopped_at)  # saved at the stop, not at the last checkpoint
    # resume to a budget a little past the stop, then compare with a run that never stopped
    make_job(run, teachers[0], iterations=stopped_at + 3, preview_every=0)
    assert finish(start(run)) == EXIT_DONE
    assert jf.read_json(os.path.join(run, jf.STATUS))["state"] == "done"
    assert f"resumed from iteration {stopped_at}" in open(os.path.join(run, jf.LOG)).read()
    straight = make_job(tmp_path / "straight", teachers[0], iterations=stopped_at + 3, preview_every=0)
    assert finish(start(straight)) == EXIT_DONE
    a, b = tensors(os.path.join(run, jf.STUDENT)), tensors(os.path.join(straight, jf.STUDENT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_worker_on_a_busy_folder_leaves_it_alone(teachers, tmp_path):
    run = make_job(tmp_path / "busy", teachers[0])
    held = jf.RunLock(run).acquire()
    try:
        assert jf.is_locked(run) is True
        assert finish(start(run)) == EXIT_BUSY
        assert not os.path.exists(os.path.join(run, jf.STATUS)) and not os.path.exists(os.path.join(run, jf.METRICS))
        assert "in use by another worker" in open(os.path.join(run, jf.LOG)).read()
    finally:
        held.release()
    assert jf.is_locked(run) is False


def test_a_resume_with_another_base_model_or_other_settings_is_refused_naming_the_change(teachers, tmp_path):
    run = make_job(tmp_path / "run", teachers[0], iterations=2)
    assert finish(start(run)) == EXIT_DONE
    state_before = tensors(os.path.join(run, jf.STATE))
    make_job(run, teachers[1], iterations=4)
    assert finish(start(run)) == EXIT_REFUSED
    status = jf.read_json(os.path.join(run, jf.STATUS))
    assert status["state"] == "failed" and "resume refused" in status["message"]
    assert "base model: a.safetensors" in status["message"] and "b.safetensors" in status["message"]
    make_job(run, teachers[0], iterations=4, stage1={"lr_student": 2e-3, "lr_fake": 1e-3, "cache_first": 1, "cache_last": 1})
    assert finish(start(run)) == EXIT_REFUSED
    message = jf.read_json(os.path.join(run, jf.STATUS))["message"]
    assert "stage1.lr_student: 0.001 -> 0.002" in message and "base model" not in message
    after = tensors(os.path.join(run, jf.STATE))
    assert all(torch.equal(state_before[k], after[k]) for k in state_before)  # nothing was touched
    make_job(run, teachers[0], iterations=4, checkpoint_every=1)  # more iterations, other reporting: allowed
    assert finish(start(run)) == EXIT_DONE and jf.read_json(os.path.join(run, jf.STATUS))["iteration"] == 4


def test_a_killed_worker_leaves_no_status_and_frees_its_lock(teachers, tmp_path):
    run = make_job(tmp_path / "killed", teachers[0], iterations=400, preview_every=0)
    proc = start(run)
    wait_for(lambda: len(jf.read_metrics(os.path.join(run, jf.METRICS))[0]) >= 2, what="two iterations")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not os.path.exists(os.path.join(run, jf.STATUS)) and jf.is_locked(run) is False
    age = jf.heartbeat_age(run)
    assert age is not None and age < jf.STALE_AFTER_S  # what a watcher sees: a fresh heartbeat, but no lock holder
