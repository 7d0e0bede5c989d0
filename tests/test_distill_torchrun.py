"""1.x-Distill under torchrun (2 processes, gloo, CPU): DDP averages each role's gradients (no hand-written
all-reduce), the run exports the same kind of student file as one process, and a run whose rank is killed
mid-way resumes from its last checkpoint when the same command runs again."""

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

from distill_core.conditioning import encode_prompt_set
from test_distill_families import LOADER, fake_text_encoder, tiny_flux

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    torch.manual_seed(0)
    module, latent_shape, extra = tiny_flux()
    root = tmp_path_factory.mktemp("torchrun")
    module.save_pretrained(str(root / "transformer"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere", "a green cone", "a white torus"], fake_text_encoder()).save(str(root / "prompts.safetensors"))

    def config(name: str, iterations: int) -> str:
        cfg = {"run_dir": str(root / name), "teacher": str(root / "transformer"), "teacher_loader": LOADER,
               "teacher_options": {"latent_shape": list(latent_shape), "extra": extra}, "prompts": str(root / "prompts.safetensors"),
               "lora_rank": 4, "iterations": iterations, "batch_size": 2, "checkpoint_every": 2, "preview_every": 0, "threads": 1,
               "device": "cpu", "stage1": {"cache_first": 1, "cache_last": 1, "lr_student": 1e-3}}
        path = root / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    return root, config


def torchrun(config: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "distill_core.train", "--config", config], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _layout(path):
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, set((f.metadata() or {}))


def test_two_processes_train_and_export_the_same_kind_of_student_as_one(flux_run):
    root, config = flux_run
    proc = torchrun(config("ddp", 4))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    single = subprocess.run([sys.executable, "-m", "distill_core.train", "--config", config("single", 4)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_layout, single_layout = _layout(root / "ddp" / "student.safetensors"), _layout(root / "single" / "student.safetensors")
    assert ddp_layout == single_layout
    metrics = [json.loads(line) for line in open(root / "ddp" / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]  # one writer (rank 0)
    with safe_open(str(root / "ddp" / "state.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["world"] == "2" and {"rng.gen.0", "rng.gen.1"} <= set(f.keys())


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return found


def test_a_killed_rank_ends_the_run_and_the_same_command_resumes_it(flux_run):
    root, config = flux_run
    path = config("killed", 40)
    proc = torchrun(path)
    state = root / "killed" / "state.safetensors"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no checkpoint was written"
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-run
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]  # torchrun stops the other rank and reports the failure
    with safe_open(str(state), framework="pt") as f:
        saved = int(f.metadata()["iteration"])
    assert 0 < saved < 40
    again = torchrun(path)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    assert f"resumed from iteration" in out
    with safe_open(str(root / "killed" / "student.safetensors"), framework="pt") as f:
        assert f.metadata()["iterations"] == "40"
