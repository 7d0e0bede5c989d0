"""Bad input through 1.x-Distill's Python and command-line entry points: run configs, shipping, student files."""

from __future__ import annotations

import json
import re
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
@pytest.mark.parametrize("changes,message", [  # literal text of the message (the field, the value, what is accepted)
    (dict(stage1={"lr_student": "fast"}), "stage1.lr_student must be a finite number > 0, got 'fast' (str)"),
    (dict(stage1={"steps": 0}), "stage1.steps must be a whole number of student steps in 1..1000, got 0"),
    (dict(stage1={"steps": 2.0}), "stage1.steps must be a whole number of student steps in 1..1000, got 2.0 (float)"),
    (dict(stage1={"lr_fake": float("nan")}), "stage1.lr_fake must be a finite number > 0, got nan"),
    (dict(stage1={"beta2": 1.0}), "stage1.beta2 must be a number in [0, 1), got 1.0"),
    (dict(stage1={"importance_sampling": "yes"}), "stage1.importance_sampling must be true or false, got 'yes'"),
    (dict(stage1={"classes": []}), "stage1.classes must be null (all) or a non-empty list of class indices >= 0, got []"),
    (dict(stage1={"cache_first": 1}), "stage1.cache_first and stage1.cache_last must both be null (no cached blocks) or "
                                      "block indices with 0 <= cache_first <= cache_last; got 1 and None"),
    (dict(stage1={"cache_first": -1, "cache_last": 2}), "0 <= cache_first <= cache_last; got -1 and 2"),
    (dict(stage1={"cache_first": 3, "cache_last": 2}), "0 <= cache_first <= cache_last; got 3 and 2"),
    (dict(stage1={"lr": 1e-3}), "unknown stage1 setting(s) ['lr']; stage1 takes ['beta1'"),
    (dict(stage1="fast"), "stage1 must be a dict of stage1 settings, got 'fast' (str)"),
    (dict(stage2={"disc_blocks": []}), "stage2.disc_blocks must be a non-empty list of block indices >= 0"),
    (dict(stage2={"real_label": 0}), "stage2.real_label must be a number in (0, 1], got 0"),
    (dict(stage2={"g_every": 0}), "stage2.g_every must be a whole number >= 1, got 0"),
    (dict(stage2={"cache_first": None}), "got None and 3"),
    (dict(stage2={"gan": True}), "unknown stage2 setting(s) ['gan']"),
    (dict(device="bogus"), "device must be null/'auto' or a torch device name such as 'cpu', 'cuda' or 'cuda:1', got 'bogus'"),
    (dict(device="meta"), "device must be null/'auto' or a torch device name"),
    (dict(teacher_options="x"), "teacher_options must be a dict of the loader's keyword arguments, got 'x' (str)"),
    (dict(lora_alpha="x"), "lora_alpha must be a number > 0 or null (= lora_rank), got 'x'"),
    (dict(lora_alpha=0), "lora_alpha must be a number > 0 or null (= lora_rank), got 0"),
    (dict(gradient_checkpointing="no"), "gradient_checkpointing must be true or false, got 'no'"),
    (dict(offload_optimizer=1), "offload_optimizer must be true or false, got 1"),
    (dict(prompts=5), "prompts must be null or a prompt-set file path, got 5 (int)"),
    (dict(teacher=""), "teacher must be null or the base model's path, got ''"),
])
def test_run_config_refuses_wrong_stage_and_run_settings_naming_field_value_and_range(tmp_path, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(run_dir=str(tmp_path), **changes)


@CLEAR
def test_every_stage_setting_has_a_rule():
    from dataclasses import fields

    from distill_core.config import CACHE_FIELDS, STAGE1_RULES, STAGE2_RULES
    from distill_core.stage1 import Stage1Config
    from distill_core.stage2 import Stage2Config

    for cls, rules in ((Stage1Config, STAGE1_RULES), (Stage2Config, STAGE2_RULES)):  # a new field must say what it accepts
        assert {f.name for f in fields(cls)} == set(rules) | set(CACHE_FIELDS)
        defaults = cls()
        assert all(ok(getattr(defaults, name)) for name, (_, ok) in rules.items())


@CLEAR
@pytest.mark.parametrize("text,message", [
    ('{"run_dir": "r", "iterations": 1,}', r"run.json is not valid JSON \(Expecting property name"),
    ("[1, 2]", "run.json must hold one JSON object of settings, got list"),
    (b"\xff\xfe", "run.json is not valid JSON"),
    ('{"run_dir": "r", "stage1": {"lr_student": "fast"}}', r"run.json: run config: stage1.lr_student must be a finite number > 0"),
    ('{"run_dir": "r", "bogus": 1}', r"run.json: run config: unknown key\(s\) \['bogus'\]"),
])
def test_a_bad_run_config_file_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "run.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        RunConfig.load(str(path))


@CLEAR
@pytest.mark.parametrize("args,config,message", [
    (["--max-minutes", "0"], {}, "max_minutes must be a number > 0"),
    (["--iterations", "-1"], {}, "iterations must be a whole number >= 0, got -1"),
    ([], {"stage1": {"steps": 0}}, "stage1.steps must be a whole number"),
    ([], None, "is not valid JSON"),
])
def test_the_train_command_line_prints_config_errors_and_exits_2(tmp_path, capsys, args, config, message):
    from distill_core import train

    path = tmp_path / "run.json"
    path.write_text("{" if config is None else json.dumps({"run_dir": str(tmp_path / "run"), "iterations": 1, **config}))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", str(path), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


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


@CLEAR
def test_shipping_keeps_a_student_that_appears_while_it_ships(tmp_path, monkeypatch):
    import shutil

    from distill_core.runtime import STUDENT_FILE

    out, weights = tmp_path / "runs", tmp_path / "weights"
    for run in demo.SHIPPED:
        (out / run).mkdir(parents=True)
        shutil.copy(SHIPPED, out / run / STUDENT_FILE)
    first = weights / demo.SHIPPED["cotrain_c175"]
    real_open = demo.safe_open

    def racing_open(path, **kwargs):  # another --ship writes the first file after the up-front check
        if not first.exists():
            first.write_bytes(b"the other shipment")
        return real_open(path, **kwargs)

    monkeypatch.setattr(demo, "safe_open", racing_open)
    with pytest.raises(FileExistsError, match="appeared while shipping; it was kept: add --overwrite"):
        demo.ship(str(out), str(weights))
    assert first.read_bytes() == b"the other shipment"
    assert sorted(p.name for p in weights.iterdir()) == [first.name]  # no temporary file left behind


@CLEAR
def test_the_demo_takes_the_run_folder_lock_before_writing_its_config(tmp_path, capsys):
    from distill_core.jobfiles import RunLock

    run_dir = tmp_path / "stage1_n2"
    run_dir.mkdir()
    held = RunLock(str(run_dir)).acquire()  # a worker (or a second demo) busy in the folder
    try:
        assert demo.main(["--out", str(tmp_path), "--only", "stage1_n2"]) == 2
    finally:
        held.release()
    assert "is in use by another worker" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"]  # no config.json, nothing else


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
    (dict(sigmas='[1.0, "x"]'), "must be numbers from 1 down to 0, strictly decreasing"),
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


@pytest.fixture()
def no_building(monkeypatch):
    """Any attempt to build the declared model fails the test: refusals must come from the header alone."""
    monkeypatch.setattr("distill_core.student.build_architecture", lambda *a, **k: pytest.fail("the model was built"))


@CLEAR
def test_a_student_declaring_40k_layers_is_refused_in_under_a_second_without_building_it(tmp_path, no_building):
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


def _flux_student(tmp_path, name="flux.safetensors", **arch_changes):
    """A diffusers FLUX student file that names its class (as every diffusers family's does)."""
    from distill_core.student import save_student_file
    from test_distill_families import tiny_flux

    torch.manual_seed(0)
    module = tiny_flux()[0]
    arch = {**dict(module.config), "_class_name": type(module).__name__, **arch_changes}
    path = str(tmp_path / name)
    save_student_file(path, module.state_dict(), "diffusers", [["double", 1], ["single", 2]], [1.0, 0.5, 0.0], 3.0,
                      None, None, {"family": "flux", "architecture": json.dumps(arch)},
                      extra={"latent_shape": "[16, 16]", "call_extra": json.dumps({"grid": [4, 4], "guidance": 3.5})})
    return path


@CLEAR
@pytest.mark.parametrize("changes,message", [
    (dict(num_layers=40_000), "declares num_layers=40000 but holds 1 such blocks"),
    (dict(num_single_layers=40_000), "declares num_single_layers=40000 but holds 2 such blocks"),
    (dict(num_layers="1"), "declares num_layers='1' but holds 1 such blocks"),
    (dict(num_attention_heads=4096), r"num_attention_heads=4096 x attention_head_dim=16 = 65536 but its first block's queries are 32 wide"),
    (dict(attention_head_dim=10**9), r"declares attention_head_dim=1000000000; a whole number in an architecture lies in 0\.\.65536"),
    (dict(in_channels=-4), r"declares in_channels=-4"),
    (dict(axes_dims_rope=[4, 6, 10**7]), r"declares axes_dims_rope=\[4, 6, 10000000\]"),
])
def test_a_named_diffusers_student_declaring_huge_or_inconsistent_sizes_is_refused_without_building(tmp_path, no_building, changes, message):
    path = _flux_student(tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as err:
        load_student(path)
    assert time.perf_counter() - start < 1.0 and "flux.safetensors" in str(err.value)


@CLEAR
@pytest.mark.parametrize("changes,message", [
    (dict(in_channels=64), r"its architecture makes proj_out.bias \[64\] but the file holds \[16\] \(3 tensor\(s\) differ\)"),
    (dict(joint_attention_dim=4096), r"its architecture makes context_embedder.weight \[32, 4096\] but the file holds \[32, 24\]"),
    (dict(num_attention_heads="2"), r"its architecture \(FluxTransformer2DModel\) cannot be built: TypeError"),
])
def test_a_named_diffusers_student_whose_widths_disagree_with_its_tensors_is_refused_before_allocating(tmp_path, changes, message):
    from distill_core import student

    real = student._built
    built = []

    def only_on_meta(path, name, make):  # the real (allocating) build must never be reached
        assert torch.empty(0).device.type == "meta", "the declared model was allocated"
        built.append(name)
        return real(path, name, make)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(student, "_built", only_on_meta)
        with pytest.raises(ValueError, match=message):
            load_student(_flux_student(tmp_path, **changes))
    assert built == ["FluxTransformer2DModel"]  # refused by the meta skeleton, the only build


@pytest.mark.bad_input("survived")
def test_a_named_diffusers_student_that_is_consistent_loads_and_samples(tmp_path):
    loaded = load_student(_flux_student(tmp_path))
    assert len(loaded.net.blocks()) == 3
    from distill_core.conditioning import Conditioning

    cond = Conditioning(torch.randn(1, 6, 24), torch.randn(1, 16))
    out = loaded.sample(torch.randn(1, 16, 16), cond)
    assert out.shape == (1, 16, 16) and torch.isfinite(out).all()


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

    holder = subprocess.Popen(  # another process writing in this folder, as a live worker would
        [sys.executable, "-c", f"import time; from distill_core.jobfiles import RunLock; "
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


@CLEAR
@pytest.mark.parametrize("code,words", [(28, "No space left on device"), (30, "Read-only file system")])
def test_a_full_disk_or_read_only_folder_ends_the_command_line_with_a_sentence_and_the_checkpoint_kept(
        tiny_teachers, tmp_path, monkeypatch, capsys, code, words):
    import json

    from distill_core import state, train
    from distill_core.runtime import STATE_FILE

    one, _ = tiny_teachers
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dict(run_dir=str(tmp_path / "run"), teacher=one, iterations=1, batch_size=2, checkpoint_every=1,
                                      preview_every=0, threads=1, stage1={"lr_student": 1e-3, "lr_fake": 1e-3})))
    assert train.main(["--config", str(config)]) == 0
    kept = (tmp_path / "run" / STATE_FILE).read_bytes()

    def no_room(tensors, path, *args, **kwargs):  # root writes anywhere, so the failure is made where files are written
        raise OSError(code, words, path)

    monkeypatch.setattr(state, "save_atomic", no_room)
    assert train.main(["--config", str(config), "--iterations", "3"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'run' / STATE_FILE}: {words}" in err and "The last checkpoint" in err
    assert "Traceback" not in err and (tmp_path / "run" / STATE_FILE).read_bytes() == kept
