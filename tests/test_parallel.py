"""distill_core.parallel: device choice, torchrun process groups, DDP per role and FSDP2 over two peft LoRA
adapters on one shared base, checked against a single process on the same global batch (gloo, CPU, 2 ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_core import parallel as P

HERE = Path(__file__).parent
SCRIPTS = HERE / "parallel_scripts"
import two_roles  # noqa: E402 (tests/parallel_scripts, on pytest's pythonpath)

# processes, torchrun or whole training runs of real models: left out of `make test-quick`
pytestmark = [pytest.mark.slow, pytest.mark.model]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(script, *args, timeout=90):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPTS / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=SCRIPTS)


def load(path):
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the whole global batch of every step."""
    out = tmp_path_factory.mktemp("single") / "single.pt"
    threads = torch.get_num_threads()
    try:
        assert two_roles.main(["--mode", "single", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return load(out)


# ------------------------------------------------------------------------------------------------ devices


def test_pick_device_and_single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert P.pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert P.pick_device(None) == torch.device("cuda", 0) == P.pick_device("cuda")
    else:
        assert P.pick_device(None) == torch.device("cpu") == P.pick_device("auto")
        with pytest.raises(ValueError, match="no CUDA device"):
            P.pick_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        P.pick_device("gpu0")
    d = P.init_distributed("cpu")  # not under torchrun: no process group
    assert (d.rank, d.world, d.local_rank, d.is_main, d.distributed) == (0, 1, 0, True, False)
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        P.init_distributed("cpu")  # a world without RANK / MASTER_ADDR is a launch mistake, said as such
    P.shutdown()  # no group: a no-op


def test_single_process_helpers_are_identity():
    d = P.Dist(0, 1, 0, torch.device("cpu"))
    lin = torch.nn.Linear(3, 3)
    step = P.wrap_role(lambda x: lin(x).square().mean(), list(lin.parameters()), d)
    assert isinstance(step, P.RoleStep) and [id(p) for p in step.parameters()] == [id(p) for p in lin.parameters()]
    assert P.shard(lin, [], d) is lin and P.all_true(True, d) and P.mean(2.5, d) == 2.5
    with pytest.raises(ValueError, match="require grad"):
        P.wrap_role(lambda: None, [torch.nn.Parameter(torch.ones(1), requires_grad=False)], d)
    shared = torch.ones(4)
    assert P.storage_bytes([shared, shared[:2], torch.ones(2)]) == 16 + 8  # a view counts once


# ------------------------------------------------------------------------------------------------ DDP's reducer


def test_ddp_reducer_with_two_roles_on_one_base(tmp_path):
    """Why wrap_role wraps a role-only view (the experiment behind parallel.py's docstring)."""
    out = tmp_path / "probe.json"
    r = torchrun("reducer_probe.py", out, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = json.loads(out.read_text())
    adapter = 6 * 2 + 2 * 6  # elements of one role's adapter
    for e in cases["view"]:  # ours: correct, the other role untouched, only this role reduced
        idle = "student" if e["role"] == "fake" else "fake"
        assert e["ok"] and e[f"{e['role']}_grad"] == "equals single process" and e[f"{idle}_grad"] == "none"
        assert e["reduced_elements"] == adapter
    for e in cases["whole"]:  # correct with find_unused, but both roles' buckets go over the wire every step
        assert e["ok"] and e[f"{e['role']}_grad"] == "equals single process" and e["reduced_elements"] == 2 * adapter
    strict = cases["whole_strict"]  # without find_unused: silently not averaged, then an error
    assert strict[0]["ok"] and strict[0]["fake_grad"] == "differs from single process"
    assert not strict[1]["ok"] and "finished reduction" in strict[1]["error"]
    two = cases["two_whole"]  # two reducers over the same parameters: the idle one's usage map is poisoned
    assert two[0]["ok"] and not two[1]["ok"] and "undefined" in two[1]["error"]
    for e in cases["leak"]:  # the other role's forward with grad: its gradient stays local (not averaged)
        if e["role"] == "student":
            assert e["ok"] and e["student_grad"] == "equals single process"
            assert e["fake_grad"] == "differs from single process"


# ------------------------------------------------------------------------------------------------ two roles, 2 ranks


def check_same_as_single(result, single):
    assert result["world"] == 2
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7)
    for got, want in zip(result["grads"], single["grads"]):  # first step's gradients, fake then student
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=k)
    got, want = result["state"]["model"], single["state"]["model"]  # adapters + compensation after N steps
    assert got.keys() == want.keys() and len(want) == 2 * 68 + 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=5e-5, msg=k)
    for role in two_roles.ROLES:  # optimiser states, gathered under their parameter names
        g, w = result["state"]["optim"][role]["state"], single["state"]["optim"][role]["state"]
        assert g.keys() == w.keys()
        for k in w:
            torch.testing.assert_close(g[k]["exp_avg"], w[k]["exp_avg"], rtol=1e-3, atol=1e-6)
    assert result["state"]["model"]["comp.weight"].abs().sum() > 0  # the cached step reached the compensation


def test_ddp_two_processes_equal_one_process(tmp_path, single):
    out = tmp_path / "ddp.pt"
    r = torchrun("two_roles.py", "--mode", "ddp", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    result = load(out)
    check_same_as_single(result, single)
    dense = result["dense_base_bytes"]
    for rank_sizes in result["sizes"]:  # each rank: exactly one copy of the base, nothing duplicated by DDP
        assert rank_sizes["base"] == dense
        assert rank_sizes["all"] == single["sizes"][0]["all"]


def test_fsdp2_two_processes_equal_one_process(tmp_path, single):
    out = tmp_path / "fsdp.pt"
    r = torchrun("two_roles.py", "--mode", "fsdp", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    result = load(out)
    check_same_as_single(result, single)
    dense = result["dense_base_bytes"]
    for rank_sizes in result["sizes"]:  # each rank: its half of the base (+ padding of uneven dim-0 shards)
        assert dense / 2 <= rank_sizes["base"] <= 0.52 * dense
        assert rank_sizes["all"] <= 0.52 * single["sizes"][0]["all"]


# ------------------------------------------------------------------------------------------------ failure and resume


def test_killed_rank_ends_the_run_and_the_checkpoint_resumes(tmp_path, single):
    """SIGKILL one rank mid-run (FSDP2): torchrun exits non-zero without hanging; the last checkpoint (full,
    world-size independent) resumes in 2 processes and in 1, and both finish equal to the uninterrupted run."""
    ckpt = tmp_path / "state.pt"
    t = time.time()
    r = torchrun("two_roles.py", "--mode", "fsdp", "--out", tmp_path / "never.pt", "--ckpt", ckpt,
                 "--kill-rank", "1", "--kill-at", "2", timeout=60)
    assert r.returncode != 0 and time.time() - t < 60
    assert "SIGKILL" in r.stderr or "Signal 9" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "never.pt").exists() and load(ckpt)["step"] == 2
    shutil.copy(ckpt, tmp_path / "copy.pt")

    out = tmp_path / "resumed.pt"
    r = torchrun("two_roles.py", "--mode", "fsdp", "--out", out, "--ckpt", ckpt, "--resume", timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 2" in r.stdout
    got, want = load(out)["state"]["model"], single["state"]["model"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=5e-5, msg=k)

    one = tmp_path / "resumed1.pt"  # the same checkpoint, one process
    threads = torch.get_num_threads()
    try:
        assert two_roles.main(["--mode", "single", "--out", str(one), "--ckpt", str(tmp_path / "copy.pt"),
                               "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    got, want = load(one)["state"]["model"], single["state"]["model"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=5e-5, msg=k)
