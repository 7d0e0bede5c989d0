"""Bad input through 1.x-Distill's Python and command-line entry points: run configs, shipping, student files."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xslim_lab import distill_demo as demo
from distill_core.config import RunConfig
from distill_core.student import load_student

CLEAR = pytest.mark.bad_input("clear error")
SHIPPED = "distill_core/weights/student_1x_175.safetensors"


@CLEAR
@pytest.mark.parametrize("field,value,message", [
    ("iterations", "100", "iterations must be a whole number >= 0"),
    ("iterations", -5, "iterations must be a whole number >= 0"),
    ("batch_size", 0, "batch_size must be a whole number >= 1"),
    ("checkpoint_every", 0, "checkpoint_every must be a whole number >= 1"),
    ("max_nonfinite", 0, "max_nonfinite must be a whole number >= 1"),
    ("threads", 1.5, "threads must be a whole number >= 1"),
    ("max_minutes", 0, "max_minutes must be a number > 0"),
    ("max_minutes", "10", "max_minutes must be a number > 0"),
    ("seed", None, "seed must be a whole number"),
    ("run_dir", "", "run_dir must be a folder path"),
])
def test_run_config_refuses_wrong_values_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**{"run_dir": str(tmp_path), field: value})


@CLEAR
def test_train_command_line_refuses_max_minutes_zero(tmp_path):
    from distill_core import train

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "iterations": 1}))
    with pytest.raises(ValueError, match="max_minutes must be a number > 0"):
        train.main(["--config", str(config), "--max-minutes", "0"])


@CLEAR
def test_shipping_never_replaces_the_shipped_students_without_overwrite(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in demo.SHIPPED.values():
        (weights / name).write_bytes(b"the shipped file")
    with pytest.raises(FileExistsError, match="add --overwrite"):
        demo.ship(str(tmp_path / "runs"), str(weights))
    assert all((weights / n).read_bytes() == b"the shipped file" for n in demo.SHIPPED.values())
    assert demo.main(["--ship", "--out", str(tmp_path / "runs")]) == 2 and "--overwrite" in capsys.readouterr().err


def _variant(tmp_path, name, drop=(), **meta_changes):
    with safe_open(SHIPPED, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    meta.update(meta_changes)
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=meta)
    return path


@CLEAR
@pytest.mark.parametrize("changes,message", [
    (dict(sigmas="[]"), "declares no usable sigmas"),
    (dict(sigmas="[1.0]"), "declares no usable sigmas"),
    (dict(sigmas='[1.0, "x"]'), "not finite and strictly decreasing"),
    (dict(cached_blocks="[4, 40]"), "exceeds the model's 12 blocks"),
    (dict(cached_blocks='"4..6"'), "must be \\[first, last\\] or null"),
    (dict(stacks="not json"), "is not valid JSON"),
    (dict(drop=("comp.img.fc1.weight",)), "missing 1 compensation"),
    (dict(drop=("model.proj_out.weight",)), "missing 1 model tensor"),
])
def test_damaged_student_files_are_refused_naming_file_and_problem(tmp_path, changes, message):
    path = _variant(tmp_path, "student.safetensors", **changes)
    with pytest.raises(ValueError, match=message) as err:
        load_student(path)
    assert "student.safetensors" in str(err.value)


@CLEAR
def test_a_student_declaring_40k_layers_is_refused_in_under_a_second_without_building_it(tmp_path):
    arch = json.loads(safe_open(SHIPPED, framework="pt").metadata()["architecture"])
    arch.update(num_layers=40_000, num_single_layers=40_000)
    path = _variant(tmp_path, "huge.safetensors", architecture=json.dumps(arch), stacks="")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="declares num_layers=40000 but holds 4 such blocks"):
        load_student(path)
    assert time.perf_counter() - start < 1.0
    path = _variant(tmp_path, "huge2.safetensors", stacks=json.dumps([["double", 40000], ["single", 8]]))
    with pytest.raises(ValueError, match="at most 1000 blocks"):
        load_student(path)


@CLEAR
def test_a_pickle_named_safetensors_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "student.safetensors"
    torch.save({"model.x": torch.zeros(1)}, path)  # a pickle archive
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_student(str(path))


@pytest.mark.bad_input("survived")
def test_checkpoints_never_write_through_a_planted_temp_link_and_never_share_a_temp_name(tmp_path):
    from distill_core.files import save_atomic
    from distill_core.state import read_state, save_state

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    state = tmp_path / "run" / "state.safetensors"
    state.parent.mkdir()
    (tmp_path / "run" / "state.safetensors.tmp").symlink_to(outside)  # the old fixed temp name, planted
    module = torch.nn.Linear(2, 2)
    save_state(str(state), {"student": module}, {}, {}, {"iteration": 3})
    assert outside.read_text() == "keep me" and read_state(str(state))[1]["iteration"] == "3"
    names = set()
    real_mkstemp = __import__("tempfile").mkstemp

    def spy(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        names.add(name)
        return fd, name

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tempfile.mkstemp", spy)
        for _ in range(3):
            save_atomic({"x": torch.zeros(1)}, str(tmp_path / "run" / "student.safetensors"))
    assert len(names) == 3  # a fresh temp name every write: two writers never rename each other's file
    with pytest.raises(FileExistsError, match="student.safetensors exists"):
        save_atomic({"x": torch.ones(1)}, str(tmp_path / "run" / "student.safetensors"), overwrite=False)


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    from xslim_lab.tiny import write_tiny_teacher

    folder = tmp_path_factory.mktemp("teachers")
    return write_tiny_teacher(str(folder / "one.safetensors")), write_tiny_teacher(str(folder / "two.safetensors"), seed=1)


def _tiny_config(run_dir, teacher, **changes):
    base = dict(run_dir=str(run_dir), teacher=teacher, iterations=2, batch_size=2, checkpoint_every=1, preview_every=0,
                threads=1, stage1={"lr_student": 1e-3, "lr_fake": 1e-3})
    return RunConfig(**{**base, **changes})


@CLEAR
@pytest.mark.parametrize("change,named", [
    ("teacher", "base model: one.safetensors"),
    ("lr", "stage1.lr_student: 0.001 -> 0.0005"),
    ("cache", "stage1.cache_first: None -> 1"),
])
def test_a_resume_with_a_changed_configuration_is_refused_naming_the_change(tiny_teachers, tmp_path, change, named):
    from distill_core.jobfiles import ResumeRefused
    from distill_core.runtime import STATE_FILE, run_training

    one, two = tiny_teachers
    run_training(_tiny_config(tmp_path, one))
    before = (tmp_path / STATE_FILE).read_bytes()
    changed = {"teacher": dict(teacher=two),
               "lr": dict(stage1={"lr_student": 5e-4, "lr_fake": 1e-3}),
               "cache": dict(stage1={"lr_student": 1e-3, "lr_fake": 1e-3, "cache_first": 1, "cache_last": 2})}[change]
    teacher = changed.pop("teacher", one)
    with pytest.raises(ResumeRefused, match=named.replace("(", "\\(")):
        run_training(_tiny_config(tmp_path, teacher, iterations=4, **changed))
    assert (tmp_path / STATE_FILE).read_bytes() == before  # the checkpoint is untouched
    assert run_training(_tiny_config(tmp_path, one, iterations=3))["iteration"] == 3  # the same settings resume


@CLEAR
def test_a_second_writer_in_the_same_run_folder_is_refused(tiny_teachers, tmp_path):
    import os
    import subprocess
    import sys

    from distill_core.jobfiles import RunFolderBusy
    from distill_core.runtime import run_training

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    holder = subprocess.Popen(  # another process writing in this folder, as a live worker would
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {repo!r}); from distill_core.jobfiles import RunLock; "
         f"held = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match="is in use by another worker"):
            run_training(_tiny_config(tmp_path, tiny_teachers[0]))
        assert not os.path.exists(tmp_path / "state.safetensors")
    finally:
        holder.kill()
        holder.wait()
