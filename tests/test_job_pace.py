"""The jobs panel's speed and ETA come from the iterations' own pace: start-up (model load, warm-up) and the first
iteration are not counted, and after a resume the figures count from the resumed iteration and never show the run
before. Run folders are written as the worker writes them (heartbeat.json, metrics.jsonl, job.json, the lock)."""

from __future__ import annotations

import json
import os

import pytest

from distill_core import jobfiles as jf
from pack import node_module

job_store = node_module("job_store", "comfyui_xslim_pace_test")
TOTAL = 100


def write_records(run_dir: str, pace: jf.Pace, times: dict) -> None:
    """metrics.jsonl lines as the worker appends them: iteration -> the time it completed."""
    with open(os.path.join(run_dir, jf.METRICS), "a") as f:
        for iteration, now in times.items():
            speed, eta = pace.add(iteration, now)
            f.write(json.dumps({"iteration": iteration, "loss_student": 1.0, "it_per_s": speed, "eta_s": eta,
                                "time": now}) + "\n")


@pytest.fixture()
def running(tmp_path):
    """A job folder whose worker holds the lock (so the store sees it live) and beats since ``started``."""
    store = job_store.JobStore(root=str(tmp_path))
    run_dir = tmp_path / "paced"
    run_dir.mkdir()
    jf.JobSpec(config={"iterations": TOTAL}, base={"name": "demo"}).write(str(run_dir))
    lock = jf.RunLock(str(run_dir)).acquire()

    def beat(started: float, iteration: int) -> None:
        jf.Beat(pid=os.getpid(), started=started, iteration=iteration, iterations=TOTAL, phase="training").write(str(run_dir))

    yield store, str(run_dir), beat
    lock.release()


def test_the_eta_counts_from_the_first_completed_iteration(running):
    store, run_dir, beat = running
    started = 1_000.0
    beat(started, 0)
    # loading took 60 s and the first iteration 30 s (warm-up); then 2 s per iteration
    pace = jf.Pace(TOTAL)
    write_records(run_dir, pace, {1: started + 90})
    first = store.summary(store.job("paced"))
    assert first["state"] == "running" and first["iteration"] == 1
    assert first["it_per_s"] is None and first["eta_s"] is None  # one iteration says nothing about the pace
    write_records(run_dir, pace, {i: started + 90 + 2 * (i - 1) for i in range(2, 11)})
    summary = store.summary(store.job("paced"))
    assert summary["iteration"] == 10
    assert summary["it_per_s"] == pytest.approx(0.5)
    assert summary["eta_s"] == pytest.approx(90 * 2.0)  # 90 iterations left at 2 s; start-up would have made it 245 s


def test_after_a_resume_the_figures_count_from_the_resumed_iteration(running):
    store, run_dir, beat = running
    beat(1_000.0, 0)
    write_records(run_dir, jf.Pace(TOTAL), {i: 1_000.0 + 10 * i for i in range(1, 41)})  # slow first run: 10 s each
    assert store.summary(store.job("paced"))["eta_s"] == pytest.approx(60 * 10.0)
    # stopped at 40, resumed from its checkpoint at 40 by a new worker (another start time) on a faster machine
    resumed_at = 5_000.0
    beat(resumed_at, 40)
    just_resumed = store.summary(store.job("paced"))
    assert just_resumed["it_per_s"] is None and just_resumed["eta_s"] is None  # never the run before's figures
    pace = jf.Pace(TOTAL)
    write_records(run_dir, pace, {41: resumed_at + 50})  # start-up and the first iteration after the resume
    assert store.summary(store.job("paced"))["eta_s"] is None
    write_records(run_dir, pace, {i: resumed_at + 50 + (i - 41) for i in range(42, 51)})
    summary = store.summary(store.job("paced"))
    assert summary["iteration"] == 50 and summary["it_per_s"] == pytest.approx(1.0)
    assert summary["eta_s"] == pytest.approx(50.0)


def test_an_ended_job_shows_no_speed_or_eta(tmp_path):
    store = job_store.JobStore(root=str(tmp_path))
    run_dir = tmp_path / "ended"
    run_dir.mkdir()
    jf.JobSpec(config={"iterations": TOTAL}, base={"name": "demo"}).write(str(run_dir))
    jf.Beat(pid=1, started=1_000.0, iteration=20, iterations=TOTAL, phase="exited").write(str(run_dir))
    write_records(str(run_dir), jf.Pace(TOTAL), {i: 1_000.0 + i for i in range(1, 21)})
    jf.Status(state="stopped", iteration=20, message="stopped as asked", student=None, time=1_100.0).write(str(run_dir))
    summary = store.summary(store.job("ended"))
    assert summary["state"] == "stopped" and summary["it_per_s"] is None and summary["eta_s"] is None


def test_the_loss_plot_reads_at_the_width_the_jobs_panel_shows_it():
    """The sidebar shows the plot about 300 px wide: its title must still be about 7 px tall or more there (the
    old 640-px plot with the 11-px bitmap font came out under 4 px)."""
    import math

    from pack import node_module

    pictures = node_module("job_pictures")
    history = [{"iteration": i, "loss_student": 1 / i + 0.05 * math.sin(i), "loss_fake": 0.5} for i in range(1, 200)]
    img = pictures.loss_plot(history, "demo-distill: running, iteration 199 of 300").convert("L")
    title = img.crop((0, 0, img.width, pictures.MARGIN_T))
    rows = [y for y in range(title.height) if min(title.crop((0, y, title.width, y + 1)).tobytes()) < 100]
    shown_height = (rows[-1] - rows[0] + 1) * 300 / img.width
    assert shown_height >= 7, (rows, img.width)
