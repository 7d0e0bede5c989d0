"""The memory planner in the trainer: before the teacher's weights are loaded, the run's setup (family, shapes and
parameter count from config.json and the safetensors headers, latent tokens, batch, LoRA rank, checkpointing,
world size, parallel mode) is predicted against ``memory_budget_gib`` (on CUDA: the GPU's memory); a run that
does not fit is refused with the planner's reason and a change that fits, one that fits logs its prediction."""

from __future__ import annotations

from dataclasses import replace

import logging

import pytest
import torch

from distill_core import memory as M
from distill_core import runtime
from distill_core.conditioning import encode_prompt_set
from distill_core.config import RunConfig
from distill_core.runtime import MemoryPlanRefused, run_memory_setup, run_training
from test_distill_families import LOADER, fake_text_encoder, tiny_flux


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.manual_seed(0)
    module, latent_shape, extra = tiny_flux()
    root = tmp_path_factory.mktemp("plan")
    module.save_pretrained(str(root / "transformer"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere"], fake_text_encoder()).save(str(root / "prompts.safetensors"))
    common = dict(teacher=str(root / "transformer"), teacher_loader=LOADER, prompts=str(root / "prompts.safetensors"),
                  teacher_options={"latent_shape": list(latent_shape), "extra": extra}, batch_size=2, threads=1,
                  device="cpu", preview_every=0, checkpoint_every=1, stage1={"cache_first": 1, "cache_last": 1})
    return root, module, common


def test_the_setup_comes_from_the_headers_without_loading(flux, monkeypatch):
    root, module, common = flux
    monkeypatch.setattr(runtime, "load_teacher_from", lambda *a, **k: pytest.fail("the teacher was loaded"))
    setup = run_memory_setup(RunConfig(run_dir=str(root / "x"), lora_rank=4, **common), 1, torch.device("cpu"))
    arch, c = setup.arch, module.config
    assert arch.family == "flux" and arch.params == sum(p.numel() for p in module.parameters())
    assert (arch.width, arch.double_blocks, arch.single_blocks) == (32, c.num_layers, c.num_single_layers)
    assert setup.tokens() == (16, 6)  # the 4x4 token grid of the latents, the prompt set's 6 text tokens
    assert (setup.mode, setup.lora_rank, setup.batch, setup.device, setup.sharding) == ("lora", 4, 2, "cpu", "none")
    two = run_memory_setup(RunConfig(run_dir=str(root / "x"), lora_rank=4, parallel="fsdp", **common), 2, torch.device("cpu"))
    assert (two.gpus, two.sharding) == (2, "fsdp")  # the base split in two (plus two gathered blocks)
    assert M.predict(two).parts["frozen weights"] < M.predict(setup).parts["frozen weights"]


def test_a_run_that_does_not_fit_is_refused_before_anything_is_loaded(flux, monkeypatch):
    root, _, common = flux
    monkeypatch.setattr(runtime, "load_teacher_from", lambda *a, **k: pytest.fail("the teacher was loaded"))
    cfg = RunConfig(run_dir=str(root / "tiny_budget"), lora_rank=4, iterations=1, memory_budget_gib=1e-4, **common)
    with pytest.raises(MemoryPlanRefused) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "does not fit 0.0001 GiB per process: it needs" in msg and "LoRA r4" in msg and "Nothing was loaded" in msg
    assert "Smallest change that fits:" in msg  # the planner's own advice (more GPUs, lower resolution, a bigger GPU)
    assert not (root / "tiny_budget" / "state.safetensors").exists()


def test_the_refusal_names_the_settings_that_fit(flux):
    """Full copies without checkpointing need more than the budget; with checkpointing they fit, and it says so."""
    root, _, common = flux
    cfg = RunConfig(run_dir=str(root / "full"), lora_rank=0, iterations=1, **common)
    setup = run_memory_setup(cfg, 1, torch.device("cpu"))
    plain, ckpt = (M.predict(replace(setup, checkpointing=c)).reserved / M.GIB for c in (False, True))
    assert ckpt < plain
    cfg.memory_budget_gib = (plain + ckpt) / 2
    with pytest.raises(MemoryPlanRefused, match=r"Settings that fit: full, fp32, batch 2, checkpointing: "):
        run_training(cfg)
    assert not (root / "full" / "state.safetensors").exists()


def test_a_run_that_fits_logs_its_prediction_and_trains(flux, caplog):
    root, _, common = flux
    with caplog.at_level(logging.INFO, logger="xslim"):
        result = run_training(RunConfig(run_dir=str(root / "fits"), lora_rank=4, iterations=1, memory_budget_gib=2, **common))
    assert result["status"] == "done"
    out = caplog.text
    assert "memory plan: LoRA r4, fp32, batch 2" in out and "fits 2 GiB per process" in out


def test_bad_placement_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="parallel must be 'ddp' or 'fsdp'"):
        RunConfig(run_dir=str(tmp_path), parallel="zero3")
    with pytest.raises(ValueError, match="shards the one shared base of the LoRA layout"):
        RunConfig(run_dir=str(tmp_path), parallel="fsdp", lora_rank=0)
    for bad in (0, -1, "8", True):
        with pytest.raises(ValueError, match="memory_budget_gib must be a number > 0"):
            RunConfig(run_dir=str(tmp_path), memory_budget_gib=bad)
