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

# processes, torchrun or whole training runs of real models: left out of `make test-quick`
pytestmark = [pytest.mark.slow, pytest.mark.model]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return write_tiny_teacher(str(folder / "a.safetensors")), write_tiny_teacher(str(folder / "b.safetensors"), seed=1)


def make_job(run_dir, teacher, base: dict | None = None, **config) -> str:
    os.makedirs(run_dir, exist_ok=True)
    cfg = dict(teacher=teacher, iterations=6, batch_size=2, checkpoint_every=2, preview_every=3, threads=1,
               stage1={"lr_student": 1e-3, "lr_fake": 1e-3, "cache_first": 1, "cache_last": 1})
    cfg.update(config)
    jf.write_json(os.path.join(run_dir, jf.JOB), {"format": JOB_FORMAT, "config": cfg,
                                                  "base": {"name": os.path.basename(teacher), **(base or {})},
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


def test_a_resume_with_another_prompt_list_or_text_encoder_is_refused_by_the_worker(teachers, tmp_path):
    """The submitter's identities of the prompt list and its CLIP (job.json's base) are part of the fingerprint."""
    ids = {"prompt_list": "aaaaaaaaaaaaaaaa", "text_encoder": "cccccccccccccccc"}
    run = make_job(tmp_path / "run", teachers[0], base=ids, iterations=2)
    assert finish(start(run)) == EXIT_DONE
    assert jf.read_json(os.path.join(run, jf.FINGERPRINT))["base"]["prompt_list"] == ids["prompt_list"]
    make_job(run, teachers[0], base={**ids, "prompt_list": "bbbbbbbbbbbbbbbb"}, iterations=3)
    assert finish(start(run)) == EXIT_REFUSED
    message = jf.read_json(os.path.join(run, jf.STATUS))["message"]
    assert "prompts: the prompt list changed (hash aaaaaaaaaaaaaaaa -> bbbbbbbbbbbbbbbb)" in message, message
    make_job(run, teachers[0], base={**ids, "text_encoder": "dddddddddddddddd"}, iterations=3)
    assert finish(start(run)) == EXIT_REFUSED
    assert "prompts: another text encoder" in jf.read_json(os.path.join(run, jf.STATUS))["message"]
    make_job(run, teachers[0], base=ids, iterations=3)
    assert finish(start(run)) == EXIT_DONE and jf.read_json(os.path.join(run, jf.STATUS))["iteration"] == 3


def test_shared_gpu_mode_caps_the_ranks_own_device(monkeypatch):
    """Under torchrun each rank caps cuda:LOCAL_RANK (the device it trains on), not device 0."""
    from distill_core.worker import apply_gpu_sharing

    capped = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: capped.append((fraction, device)))
    job = {"gpu": {"mode": "shared", "memory_fraction": 0.3}, "config": {"device": "cuda"}}
    monkeypatch.setenv("LOCAL_RANK", "1")
    apply_gpu_sharing(job)
    monkeypatch.setenv("LOCAL_RANK", "0")
    apply_gpu_sharing(job)
    apply_gpu_sharing({**job, "gpu": {"mode": "exclusive"}})  # other modes cap nothing
    assert capped == [(0.3, torch.device("cuda", 1)), (0.3, torch.device("cuda", 0))]


# torchrun runs this file per rank; it notes every status.json write with the writer's rank, then runs the worker
RANKED_WORKER = """
import os, sys
from distill_core import jobfiles as jf, worker

real = jf.write_json
def noted(path, data):
    if os.path.basename(path) == jf.STATUS:
        with open({log!r}, "a") as f:
            f.write(os.environ.get("RANK", "?") + "\\n")
    real(path, data)
jf.write_json = noted
sys.exit(worker.main(sys.argv[1:]))
"""


def test_the_worker_under_torchrun_on_the_cpu_ends_done_with_one_status_writer(teachers, tmp_path):
    run = make_job(tmp_path / "ddp", teachers[0], iterations=3, preview_every=0, device="cpu")
    log = tmp_path / "status_writers.txt"
    script = tmp_path / "ranked_worker.py"
    script.write_text(RANKED_WORKER.format(log=str(log)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                          "--run-dir", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    status = jf.read_json(os.path.join(run, jf.STATUS))
    assert status["state"] == "done" and status["iteration"] == 3, status
    assert log.read_text().split() == ["0"]  # rank 0 alone wrote the final word
    assert [r["iteration"] for r in jf.read_metrics(os.path.join(run, jf.METRICS))[0]] == [1, 2, 3]  # one metrics writer
    assert jf.is_locked(run) is False


def test_a_killed_worker_leaves_no_status_and_frees_its_lock(teachers, tmp_path):
    run = make_job(tmp_path / "killed", teachers[0], iterations=400, preview_every=0)
    proc = start(run)
    wait_for(lambda: len(jf.read_metrics(os.path.join(run, jf.METRICS))[0]) >= 2, what="two iterations")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not os.path.exists(os.path.join(run, jf.STATUS)) and jf.is_locked(run) is False
    age = jf.heartbeat_age(run)
    assert age is not None and age < jf.STALE_AFTER_S  # what a watcher sees: a fresh heartbeat, but no lock holder
