"""The trainer's command lines as a user drives them: their --help names only what exists, a prompt list is
encoded from the command line, any student samples from the command line, and the trainer's output reads well
in a redirected log."""

from __future__ import annotations

import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every command line of the trainer and its measuring tools (python -m NAME)
COMMANDS = ("distill_core.train", "distill_core.worker", "distill_core.prompts", "xslim_lab.distill_sample",
            "xslim_lab.distill_demo", "xslim_lab.distill_evaluate", "xslim_lab.memory_bench")


def _help(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def repository_paths(text: str) -> list[str]:
    """The repository paths a text names: words with a '/' whose first part is an entry of the repository root."""
    top = set(os.listdir(REPO))
    words = re.findall(r"[A-Za-z_][\w.-]*(?:/[\w.-]*)+", text)
    return [w.rstrip(".,;:") for w in words if w.split("/", 1)[0] in top]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_path_a_help_text_names_exists(module, capsys):
    text = _help(module, capsys)
    named = repository_paths(text)
    missing = [p for p in named if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"python -m {module} --help names {missing}, which the repository does not have:\n{text}"


def test_the_path_finder_sees_a_missing_folder():
    assert repository_paths("run config JSON (see distill_core/configs/)") == ["distill_core/configs/"]
    assert repository_paths("latent side (tokens = (side/2)^2), ~/.cache/xslim") == []


# -- a prompt set from the command line ------------------------------------------------------------------------------
def tiny_flux_pipeline(folder: str) -> str:
    """A whole diffusers FLUX pipeline folder with random weights: the tiny transformer of the family tests, a CLIP
    text model (pooled 16 wide) and a T5 encoder (24 wide) with tiny character tokenizers; no VAE."""
    import string

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from test_distill_families import tiny_flux

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p + c, -1.0) for p in ("\u2581", "") for c in string.ascii_lowercase]
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    transformer, _, _ = tiny_flux()
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
                 tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), text_encoder_2=t5,
                 tokenizer_2=T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512), transformer=transformer
                 ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory):
    return tiny_flux_pipeline(str(tmp_path_factory.mktemp("pipeline") / "flux"))


def test_a_prompt_list_is_encoded_into_the_set_the_trainer_reads(flux_pipeline, tmp_path, capsys):
    from distill_core import prompts as cli
    from distill_core.config import RunConfig
    from distill_core.conditioning import PromptSet
    from distill_core.runtime import load_run_teacher
    from test_distill_families import LOADER

    listing = tmp_path / "prompts.txt"
    listing.write_text("# training prompts\na red cube\n\na blue sphere\na green cone\n", encoding="utf-8")
    out = tmp_path / "sets" / "flux.safetensors"
    code = cli.main(["encode", "--base", flux_pipeline, "--prompts", str(listing), "--out", str(out), "--max-tokens", "8"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and "3 prompts" in printed
    written = out.read_bytes()  # a second run to the same file is refused unless it says --overwrite
    args = ["encode", "--base", flux_pipeline, "--prompts", str(listing), "--out", str(out), "--max-tokens", "8"]
    assert cli.main(args) == 2 and "give --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == written
    assert cli.main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    loaded = PromptSet.load(str(out))
    assert loaded.prompts == ["a red cube", "a blue sphere", "a green cone"]
    assert loaded.encoder_shape == {"context": [8, 24], "pooled": [16]}  # T5 width 24 x 8 tokens, CLIP pooled 16
    assert not loaded.cond.context[0].equal(loaded.cond.context[1]) and loaded.uncond.context.shape == (1, 8, 24)
    # the trainer's own reader, checked against the transformer it will train
    cfg = RunConfig(run_dir=str(tmp_path / "run"), teacher=os.path.join(flux_pipeline, "transformer"), teacher_loader=LOADER,
                    teacher_options={"latent_shape": [16, 16], "extra": {"grid": [4, 4]}}, prompts=str(out))
    teacher = load_run_teacher(cfg)
    assert teacher.prompts.content_hash() == loaded.content_hash() and teacher.base["family"] == "flux"


def test_the_transformer_folder_alone_is_refused_naming_the_pipeline_folder(flux_pipeline, tmp_path, capsys):
    from distill_core import prompts as cli

    listing = tmp_path / "prompts.txt"
    listing.write_text("a red cube\n", encoding="utf-8")
    code = cli.main(["encode", "--base", os.path.join(flux_pipeline, "transformer"), "--prompts", str(listing),
                     "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "not a diffusers pipeline folder (no model_index.json)" in err and "transformer/" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main(["encode", "--base", flux_pipeline, "--family", "sd3", "--prompts", str(listing),
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is a flux pipeline" in capsys.readouterr().err


# -- sampling any student from the command line ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_student(flux_pipeline, tmp_path_factory):
    """A text-family student: one LoRA iteration on the pipeline's tiny FLUX transformer, blocks 1..1 cached."""
    from distill_core import prompts as cli
    from distill_core.config import RunConfig
    from distill_core.runtime import run_training
    from test_distill_families import LOADER

    root = tmp_path_factory.mktemp("student")
    (root / "prompts.txt").write_text("a red cube\na blue sphere\n", encoding="utf-8")
    prompts = str(root / "prompts.safetensors")
    cli.encode_file(flux_pipeline, str(root / "prompts.txt"), prompts, max_tokens=8)
    transformer = os.path.join(flux_pipeline, "transformer")
    cfg = RunConfig(run_dir=str(root / "run"), teacher=transformer, teacher_loader=LOADER, prompts=prompts,
                    teacher_options={"latent_shape": [16, 16], "extra": {"grid": [4, 4]}}, lora_rank=4, iterations=1,
                    batch_size=1, preview_every=0, threads=1, device="cpu", stage1={"cache_first": 1, "cache_last": 1})
    result = run_training(cfg)
    assert result["status"] == "done"
    return result["student"], transformer, prompts


def test_a_text_family_student_samples_from_the_command_line(flux_student, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    student, transformer, prompts = flux_student
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, "-m", "xslim_lab.distill_sample", "--student", student, "--base", transformer,
                           "--prompts", prompts, "--per-class", "3", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "effective NFE 1.67" in done.stdout  # 2 steps, 1 of 3 blocks cached
    assert Image.open(out).size == (3 * 4 * 8, 2 * 4 * 8)  # 3 samples per prompt (4x4 token grids), 2 prompt rows


def test_a_text_family_student_without_prompts_or_with_the_pipeline_folder_is_refused(flux_student, flux_pipeline, tmp_path, capsys):
    from xslim_lab import distill_sample

    student, transformer, _ = flux_student
    assert distill_sample.main(["--student", student, "--base", transformer, "--out", str(tmp_path / "a.png")]) == 2
    assert "this is a flux student, conditioned on text: give --prompts" in capsys.readouterr().err
    assert distill_sample.main(["--student", student, "--base", flux_pipeline, "--out", str(tmp_path / "a.png")]) == 2
    assert "give its transformer folder" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_the_shipped_demo_student_still_samples_its_class_grid(tmp_path, capsys):
    from xslim_lab import distill_sample

    out = tmp_path / "demo.png"
    student = os.path.join(REPO, "distill_core", "weights", "student_1x_175.safetensors")
    assert distill_sample.main(["--student", student, "--per-class", "1", "--out", str(out)]) == 0
    assert "effective NFE 1.75" in capsys.readouterr().out and out.is_file()


# -- real CFG on a guidance-distilled model ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2.0, 1.0])
def test_real_cfg_on_a_model_with_embedded_guidance_is_warned_about_once(scale, tmp_path, caplog):
    import logging

    import torch

    from distill_core.conditioning import encode_prompt_set
    from distill_core.config import RunConfig
    from distill_core.runtime import run_training
    from test_distill_families import LOADER, fake_text_encoder, tiny_flux

    torch.manual_seed(0)
    module, latent_shape, extra = tiny_flux()  # guidance_embeds=True, as FLUX.1-dev
    module.save_pretrained(str(tmp_path / "flux"), safe_serialization=True)
    encode_prompt_set(["a red cube"], fake_text_encoder()).save(str(tmp_path / "p.safetensors"))
    cfg = RunConfig(run_dir=str(tmp_path / "run"), teacher=str(tmp_path / "flux"), teacher_loader=LOADER,
                    teacher_options={"latent_shape": list(latent_shape), "extra": extra}, prompts=str(tmp_path / "p.safetensors"),
                    lora_rank=4, iterations=0, batch_size=1, preview_every=0, threads=1, device="cpu",
                    stage1={"guidance_scale": scale})
    with caplog.at_level(logging.INFO, logger="xslim"):
        assert run_training(cfg)["status"] == "done"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "guided twice" in r.getMessage()]
    if scale == 1.0:
        assert not warned
    else:
        assert len(warned) == 1
        text = warned[0].getMessage()
        assert "stage1.guidance_scale is 2 on a FLUX model" in text and "embedded guidance 3.5" in text
        assert "Set stage1.guidance_scale to 1" in text


def test_models_without_embedded_guidance_are_not_warned_about(tmp_path):
    from distill_core.config import RunConfig
    from distill_core.models import FlowModel
    from distill_core.runtime import double_guidance_warning
    from test_distill_families import tiny_sd3
    from xslim_demo.distill import load_demo_teacher

    cfg = RunConfig(run_dir=str(tmp_path))  # stage1.guidance_scale 2 (the demo's)
    assert double_guidance_warning(cfg, FlowModel(tiny_sd3()[0], (4, 8, 8))) is None
    assert double_guidance_warning(cfg, load_demo_teacher(None).flow) is None  # HunyuanVideo-shaped, no guidance input


def test_only_fsdps_view_warning_is_silenced():
    import warnings

    from distill_core.parallel import quiet_fsdp_view_warning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_fsdp_view_warning()
        warnings.warn("FSDP2-wrapped module (FSDPFluxSingleTransformerBlock) returned a view tensor. An in-place op on "
                      "this view ...", UserWarning, stacklevel=2)
        warnings.warn("FSDP2 something else went wrong", UserWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["FSDP2 something else went wrong"]


# -- a redirected log --------------------------------------------------------------------------------------------------
def test_a_redirected_training_log_has_progress_lines_and_no_carriage_returns(tmp_path):
    """The train command with its output into a pipe (a job log): no tqdm bar, plain progress lines instead."""
    import json
    import subprocess
    import sys

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "iterations": 4, "batch_size": 1, "checkpoint_every": 4,
                                  "preview_every": 0, "threads": 1, "device": "cpu"}))
    done = subprocess.run([sys.executable, "-m", "distill_core.train", "--config", str(config)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    out = done.stdout.decode()
    assert done.returncode == 0, out[-3000:]
    assert "\r" not in out, out[-2000:]
    progress = [line for line in out.splitlines() if line.startswith("[1.x-Distill stage1] iteration ")]
    assert [line.split(" (")[0] for line in progress] == [f"[1.x-Distill stage1] iteration {i}/4" for i in (1, 2, 3, 4)]
    assert "it/s, ETA" in progress[-1] and "loss_student" in progress[-1]
    assert out.count("[1.x-Distill] stage1: done at iteration 4") == 1


def test_a_terminal_still_gets_the_bar(caplog):
    import io
    import logging

    from distill_core.runtime import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with caplog.at_level(logging.INFO, logger="xslim"):
        bar = Progress(20, 0, "1.x-Distill stage1", stream=screen)
        for i in range(1, 21):
            bar.update({"iteration": i, "loss_student": 0.5, "it_per_s": 2.0, "eta_s": 20 - i})
        bar.close()
    assert "\r" in screen.getvalue() and "20/20" in screen.getvalue() and not caplog.records
    log_only = Progress(20, 0, "1.x-Distill stage1", stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="xslim"):
        for i in range(1, 21):
            log_only.update({"iteration": i, "loss_student": 0.5, "it_per_s": 2.0, "eta_s": 20 - i})
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"[1.x-Distill stage1] iteration {i}/20" for i in (1, *range(2, 21, 2))]


# -- the latent shape of each family, written down --------------------------------------------------------------------
def test_every_trainable_familys_latent_shape_is_documented():
    import sys

    from xslim_core.families import trainable_families

    table = open(os.path.join(REPO, "docs", "DISTILL.md"), encoding="utf-8").read().split("**Latent shape per family**")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for spec in trainable_families():
        doc = sys.modules[spec.adapter.__module__].__doc__ or ""
        assert "Latent (``teacher_options.latent_shape``, one sample)" in doc, spec.id
        assert any(row.startswith(f"| {spec.display_name}") for row in rows), spec.display_name
