"""1.x-Distill under torchrun (2 processes, gloo, CPU): DDP averages each role's gradients (no hand-written
all-reduce); FSDP2 (``parallel: "fsdp"``) shards the shared LoRA base so each rank holds half of it and trains
exactly as DDP does; both export the same kind of student file as one process, FSDP's checkpoint resumes in one
process, and a run whose rank is killed mid-way resumes from its last checkpoint when the same command runs again."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distill_core.conditioning import encode_prompt_set
from test_distill_families import LOADER, fake_text_encoder, tiny_flux

# processes, torchrun or whole training runs of real models: left out of `make test-quick`
pytestmark = [pytest.mark.slow, pytest.mark.model]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    torch.manual_seed(0)
    module, latent_shape, extra = tiny_flux()
    root = tmp_path_factory.mktemp("torchrun")
    module.save_pretrained(str(root / "transformer"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere", "a green cone", "a white torus"], fake_text_encoder()).save(str(root / "prompts.safetensors"))

    def config(name: str, iterations: int, **more) -> str:
        cfg = {"run_dir": str(root / name), "teacher": str(root / "transformer"), "teacher_loader": LOADER,
               "teacher_options": {"latent_shape": list(latent_shape), "extra": extra}, "prompts": str(root / "prompts.safetensors"),
               "lora_rank": 4, "iterations": iterations, "batch_size": 2, "checkpoint_every": 2, "preview_every": 0, "threads": 1,
               "device": "cpu", "stage1": {"cache_first": 1, "cache_last": 1, "lr_student": 1e-3}, **more}
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


def one_process(config: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_core.train", "--config", config, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_and_single(flux_run):
    """The same 4-iteration run with DDP over 2 processes and in one process."""
    root, config = flux_run
    proc = torchrun(config("ddp", 4))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    (root / "ddp.log").write_text(out)
    single = one_process(config("single", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    return root


def test_two_processes_train_and_export_the_same_kind_of_student_as_one(flux_run, ddp_and_single):
    root, config = flux_run
    ddp_layout, single_layout = _layout(root / "ddp" / "student.safetensors"), _layout(root / "single" / "student.safetensors")
    assert ddp_layout == single_layout
    metrics = [json.loads(line) for line in open(root / "ddp" / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]  # one writer (rank 0)
    with safe_open(str(root / "ddp" / "state.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["world"] == "2" and {"rng.gen.0", "rng.gen.1"} <= set(f.keys())


def test_only_rank_0_says_the_final_line(flux_run, ddp_and_single):
    out = (ddp_and_single / "ddp.log").read_text()
    assert out.count("[1.x-Distill] stage1: done at iteration 4") == 1, out[-3000:]


def test_ddps_unused_parameter_warning_is_explained_before_it_can_appear(ddp_and_single):
    out = (ddp_and_single / "ddp.log").read_text()
    note = out.find("torch may warn once per process that 'find_unused_parameters=True")
    assert note >= 0 and out.count("torch may warn once per process") == 1, out[-3000:]  # rank 0 only
    warned = out.find("did not find any unused parameters in the forward pass")
    assert warned == -1 or warned > note


def test_fsdp_shards_the_base_and_trains_exactly_as_ddp(flux_run, ddp_and_single):
    """FSDP2 over 2 processes: each rank holds half of the frozen base; every rank makes the same module calls
    (a rank without cached rows, or without guided rows, still runs those passes on a zero-weighted row), so the
    run equals the DDP run with the same seeds; the student file is the merged one a single process writes, and
    the gathered checkpoint continues in one process."""
    root, config = flux_run
    proc = torchrun(config("fsdp", 4, parallel="fsdp", preview_every=2))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "returned a view tensor" not in out  # FSDP2's warning on every view output, known harmless (parallel.py)
    held = re.search(r"FSDP over 2 processes: base weight bytes per rank \[(\d+), (\d+)\] of (\d+)", out)
    assert held, out[-2000:]
    rank0, rank1, dense = map(int, held.groups())
    for part in (rank0, rank1):  # half, plus the padding of dim-0 shards of uneven size
        assert dense / 2 <= part <= 0.52 * dense
    fsdp_student, ddp_student = root / "fsdp" / "student.safetensors", root / "ddp" / "student.safetensors"
    assert _layout(fsdp_student) == _layout(root / "single" / "student.safetensors")
    got, want = load_file(str(fsdp_student)), load_file(str(ddp_student))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    base = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(got[f"model.{k}"], v) for k, v in base.items())  # the student did move
    got, want = load_file(str(root / "fsdp" / "state.safetensors")), load_file(str(root / "ddp" / "state.safetensors"))
    assert got.keys() == want.keys()  # adapters, compensation and AdamW moments in the single-process layout
    for k in (k for k in want if not k.startswith("rng.")):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert sorted(os.listdir(root / "fsdp" / "previews")) == ["00002.png", "00004.png"]  # every rank sampled, rank 0 wrote

    shutil.copytree(root / "fsdp", root / "fsdp_then_one")
    (root / "fsdp_then_one" / "lock").unlink(missing_ok=True)
    one = one_process(config("fsdp", 6, parallel="fsdp", preview_every=2), "--run-dir", str(root / "fsdp_then_one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from iteration 4" in one.stdout
    with safe_open(str(root / "fsdp_then_one" / "student.safetensors"), framework="pt") as f:
        assert f.metadata()["iterations"] == "6"


def test_stage2_under_fsdp_trains_exactly_as_ddp(flux_run, ddp_and_single):
    """Stage II (generator on the cached step, discriminator heads replicated under DDP, features from the sharded
    base by block hooks) from the DDP run's LoRA student: FSDP2 gives the DDP run's states and student."""
    root, config = flux_run
    s2 = {"cache_first": 1, "cache_last": 1, "disc_blocks": [0, 2], "disc_warmup": 1, "comp_warmup": 1, "g_every": 2,
          "output_weight": 1.0}
    for parallel in ("ddp", "fsdp"):
        student = str(root / "ddp" / "student.safetensors")
        proc = torchrun(config(f"stage2_{parallel}", 5, parallel=parallel, stage="stage2", init_student=student,
                               reference=student, stage2=s2))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    for name in ("state", "student"):
        got = load_file(str(root / "stage2_fsdp" / f"{name}.safetensors"))
        want = load_file(str(root / "stage2_ddp" / f"{name}.safetensors"))
        assert got.keys() == want.keys()
        for k in (k for k in want if not k.startswith("rng.")):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


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


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_rank_ends_the_run_and_the_same_command_resumes_it(flux_run, parallel):
    root, config = flux_run
    path = config(f"killed_{parallel}", 40, parallel=parallel)
    proc = torchrun(path)
    state = root / f"killed_{parallel}" / "state.safetensors"
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
    assert "resumed from iteration" in out
    with safe_open(str(root / f"killed_{parallel}" / "student.safetensors"), framework="pt") as f:
        assert f.metadata()["iterations"] == "40"
