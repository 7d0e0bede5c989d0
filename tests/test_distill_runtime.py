"""1.x-Distill training runtime on a tiny random model: exact resume, stop flag and progress callback,
the non-finite guard, SIGKILL + resume from the command line, and a 2-process gloo run under torchrun."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open

from distill_core.config import RunConfig
from distill_core.runtime import METRICS_FILE, STATE_FILE, STUDENT_FILE, run_training
from distill_core.student import load_student
from xslim_lab.tiny import write_tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return write_tiny_teacher(str(tmp_path_factory.mktemp("tiny") / "teacher.safetensors"))


def _config(run_dir, teacher_path, **kw):
    base = dict(run_dir=str(run_dir), teacher=teacher_path, iterations=4, batch_size=2, checkpoint_every=2,
                preview_every=0, threads=1, stage1={"lr_student": 1e-3, "lr_fake": 1e-3})
    return RunConfig(**{**base, **kw})


def _tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resume_continues_exactly_where_it_stopped(teacher_path, tmp_path):
    straight = run_training(_config(tmp_path / "a", teacher_path))
    first = run_training(_config(tmp_path / "b", teacher_path, iterations=2))
    second = run_training(_config(tmp_path / "b", teacher_path))
    assert straight["status"] == first["status"] == second["status"] == "done"
    assert second["message"] == "resumed from iteration 2" and second["iteration"] == 4
    a, _ = _tensors(straight["student"])
    b, meta = _tensors(second["student"])
    assert meta["iterations"] == "4" and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # both optimisers, RNG and data cursor restored
    state, smeta = _tensors(str(tmp_path / "b" / STATE_FILE))
    assert smeta["iteration"] == "4" and any(k.startswith("optim.fake.") for k in state)
    records = [json.loads(line) for line in open(tmp_path / "b" / METRICS_FILE)]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert {"loss_student", "loss_fake", "grad_student", "it_per_s", "eta_s", "time"} <= set(records[-1])
    # the pace counts from each run's first completed iteration: none for iteration 1, nor for 3 (the first after
    # the resume at 2); then the iterations since
    assert [r["eta_s"] is None for r in records] == [True, False, True, False]
    assert records[3]["it_per_s"] > 0 and records[3]["eta_s"] == 0


def test_regression_run_keeps_its_teacher_pairs_and_a_resume_is_exact(teacher_path, tmp_path):
    """A run with the paired regression makes its pairs once, logs the gap to them, and resumes bit-exactly from
    the pairs file it kept (not sampled again)."""
    stage1 = {"lr_student": 1e-3, "lr_fake": 1e-3, "regression_weight": 0.5, "regression_pairs": 6,
              "regression_steps": 2, "regression_batch": 2}
    straight = run_training(_config(tmp_path / "a", teacher_path, stage1=stage1))
    run_training(_config(tmp_path / "b", teacher_path, stage1=stage1, iterations=2))
    pairs = tmp_path / "b" / "teacher_pairs.rank0.safetensors"
    stamp = pairs.stat().st_mtime_ns
    second = run_training(_config(tmp_path / "b", teacher_path, stage1=stage1))
    assert second["message"] == "resumed from iteration 2" and pairs.stat().st_mtime_ns == stamp
    a, _ = _tensors(straight["student"])
    b, _ = _tensors(second["student"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in open(tmp_path / "b" / METRICS_FILE)]
    assert all(r["regression_gap"] > 0 for r in records)


def test_cache_cotraining_fine_tune_starts_from_a_finished_stage1_run(teacher_path, tmp_path):
    """Distill-Cache co-training as a fine-tune: student and fake score start from the finished run, the exported
    1.x student carries the cached range and its compensation, and Stage II continues from that compensation."""
    base = run_training(_config(tmp_path / "base", teacher_path, iterations=2))
    tuned = _config(tmp_path / "tuned", teacher_path, iterations=0, init_student=base["student"],
                    init_fake=str(tmp_path / "base" / STATE_FILE),
                    stage1={"lr_student": 1e-3, "lr_fake": 1e-3, "cache_first": 1, "cache_last": 2})
    start = run_training(tuned)  # zero iterations: exports exactly the starting point
    a, _ = _tensors(base["student"])
    b, meta = _tensors(start["student"])
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model."))
    base_state, _ = _tensors(str(tmp_path / "base" / STATE_FILE))
    tuned_state, _ = _tensors(str(tmp_path / "tuned" / STATE_FILE))
    assert all(torch.equal(base_state[k], tuned_state[k]) for k in base_state if k.startswith("module.fake."))
    assert json.loads(meta["cached_blocks"]) == [1, 2] and meta["effective_nfe"] == "1.3333"  # 2 of the 3 blocks
    tuned.iterations = 2
    trained_path = run_training(tuned)["student"]
    trained = load_student(trained_path)
    assert any(p.abs().sum() > 0 for p in trained.compensation.img.fc2.parameters())
    stage2 = _config(tmp_path / "stage2", teacher_path, stage="stage2", iterations=0, init_student=trained_path,
                     reference=base["student"], stage2={"cache_first": 1, "cache_last": 2, "disc_blocks": [0, 2]})
    c, _ = _tensors(trained_path)
    d, _ = _tensors(run_training(stage2)["student"])
    assert all(torch.equal(c[k], d[k]) for k in c if k.startswith("comp."))
    with pytest.raises(ValueError, match="not a 1.x-Distill training state"):
        run_training(_config(tmp_path / "bad", teacher_path, init_student=base["student"], init_fake=base["student"]))


def test_stop_flag_and_progress_callback(teacher_path, tmp_path):
    stop, seen = threading.Event(), []

    def progress(record):
        seen.append(record["iteration"])
        stop.set()

    worker_result = {}
    worker = threading.Thread(target=lambda: worker_result.update(
        run_training(_config(tmp_path, teacher_path, iterations=50, preview_every=1), progress, stop)))
    worker.start()
    worker.join(120)
    assert worker_result["status"] == "stopped" and worker_result["iteration"] == 1 and seen == [1]
    assert os.path.exists(tmp_path / STATE_FILE) and os.path.exists(tmp_path / "previews" / "00001.png")


def test_non_finite_losses_are_skipped_then_stop_without_writing(tmp_path):
    poisoned = write_tiny_teacher(str(tmp_path / "nan_teacher.safetensors"), poison=True)
    result = run_training(_config(tmp_path / "run", poisoned, iterations=20, max_nonfinite=3))
    assert result["status"] == "failed" and result["iteration"] == 3 and result["student"] is None
    assert "3 consecutive non-finite" in result["message"]
    assert not os.path.exists(tmp_path / "run" / STATE_FILE)
    records = [json.loads(line) for line in open(tmp_path / "run" / METRICS_FILE)]
    assert all(r["skipped"] for r in records)


def _write_config(path, cfg: RunConfig):
    from dataclasses import asdict

    path.write_text(json.dumps(asdict(cfg)))
    return str(path)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_last_checkpoint(teacher_path, tmp_path):
    run_dir = tmp_path / "run"
    config = _write_config(tmp_path / "run.json", _config(run_dir, teacher_path, iterations=500, checkpoint_every=3))
    cmd = [sys.executable, "-m", "distill_core.train", "--config", config]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / STATE_FILE
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    killed_at = int(_tensors(str(state))[1]["iteration"])
    assert killed_at % 3 == 0
    out = subprocess.run(cmd + ["--iterations", str(killed_at + 2)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from iteration {killed_at}" in out.stdout
    records = [json.loads(line) for line in open(run_dir / METRICS_FILE)]
    assert [r["iteration"] for r in records[-2:]] == [killed_at + 1, killed_at + 2]
    assert load_student(str(run_dir / STUDENT_FILE)).meta["iterations"] == str(killed_at + 2)
    # the same figures as a run that was never killed
    straight = run_training(_config(tmp_path / "straight", teacher_path, iterations=killed_at + 2, checkpoint_every=3))
    a, _ = _tensors(straight["student"])
    b, _ = _tensors(str(run_dir / STUDENT_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_writes_the_same_kind_of_checkpoint(teacher_path, tmp_path):
    run_dir = tmp_path / "ddp"
    config = _write_config(tmp_path / "ddp.json", _config(run_dir, teacher_path, iterations=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "distill_core.train", "--config", config]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    state, meta = _tensors(str(run_dir / STATE_FILE))
    assert meta["world"] == "2" and meta["iteration"] == "2"
    assert "rng.gen.0" in state and "rng.gen.1" in state and not torch.equal(state["rng.gen.0"], state["rng.gen.1"])
    student = load_student(str(run_dir / STUDENT_FILE))
    assert student.sigmas == pytest.approx([1.0, 0.75, 0.0], abs=1e-3) and student.meta["stage"] == "stage1"
    assert any(k.startswith("module.student.") for k in state)


def test_the_demo_trains_a_fresh_run_folder_and_a_second_writer_is_refused(teacher_path, tmp_path):
    """xslim_lab.distill_demo / distill_ablation open the folder before config.json is written; run_training then
    finds it open in this process (it once took the lock a second time and refused its own demo)."""
    from distill_core.jobfiles import OpenRun, RunFolderBusy
    from xslim_lab.distill_demo import run_locked

    cfg = _config(tmp_path / "demo", teacher_path, iterations=2)
    result = run_locked(cfg)
    assert result["status"] == "done" and os.path.exists(tmp_path / "demo" / "config.json")
    with OpenRun(cfg.run_dir):  # someone else holds the folder: the demo is refused before it writes anything
        before = os.path.getmtime(tmp_path / "demo" / "config.json")
        with pytest.raises(RunFolderBusy):
            run_locked(_config(tmp_path / "demo", teacher_path, iterations=3))
        assert os.path.getmtime(tmp_path / "demo" / "config.json") == before
