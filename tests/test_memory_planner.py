"""The memory planner: predictions against measured peaks on tiny models, its choices and refusals, bad input."""

import re
from dataclasses import replace

import pytest

from distill_core import memory as M


@pytest.mark.parametrize("name,mode,ckpt", [
    ("demo", "lora", False),  # the demo teacher: one shared base, two adapters
    ("sd3", "full", True),  # three full copies with per-block checkpointing
    ("flux", "lora", True),
    ("hunyuan_video", "full", False),
])
def test_prediction_within_25_percent_of_measured_peak(name, mode, ckpt):
    if mode == "lora":
        pytest.importorskip("peft")
    from xslim_lab import memory_bench as B

    r = B.measure(B.tiny(name), mode, ckpt, batch=2)
    assert r["measured"] > 0
    assert abs(r["error"]) < 0.25, r


def test_each_saving_lowers_the_prediction():
    s = M.model_setup("sd3.5-large", batch=2)
    full = M.predict(s).reserved
    assert M.predict(replace(s, checkpointing=True)).reserved < full
    assert M.predict(replace(s, mode="lora")).reserved < full
    assert M.predict(replace(s, offload_optimizer=True)).reserved < full
    assert M.predict(replace(s, gpus=8, sharding="fsdp")).reserved < full
    lora = M.predict(replace(s, mode="lora"))
    assert M.predict(replace(s, mode="lora", lora_rank=8)).reserved < lora.reserved
    assert lora.parts["frozen weights"] == s.arch.params * 2  # one bf16 base, not three copies
    big = M.predict(replace(s, resolution=(2048, 2048))).reserved
    assert big > full


def test_plan_keeps_the_published_recipe_when_it_fits():
    p = M.plan(M.model_setup("demo", resolution=(32, 32), batch=16, dtype="fp32", device="cpu"), 1.0)
    assert p.fits and p.prediction.setup.mode == "full" and not p.prediction.setup.checkpointing
    assert "fits in 1.0 GiB" in p.message


def test_plan_turns_on_savings_in_order():
    s = M.model_setup("sd3.5-medium")
    p24 = M.plan(s, 24e9 / M.GIB)
    assert p24.fits and p24.prediction.setup.mode == "lora", p24.message
    assert p24.prediction.reserved <= 24e9
    p8 = M.plan(replace(s, gpus=8, batch=4), 80e9 / M.GIB)
    assert p8.fits and p8.prediction.setup.sharding == "fsdp" and p8.prediction.setup.mode == "full", p8.message
    # without LoRA a 24 GB card needs the optimizer on the host and still cannot hold three 2.5B copies
    no_lora = M.plan(s, 24e9 / M.GIB, allow_lora=False)
    assert not no_lora.fits and "Smallest change that fits" in no_lora.message


def test_plan_refuses_with_reason_and_smallest_change():
    p = M.plan(M.model_setup("flux.1-dev"), 24e9 / M.GIB)
    assert not p.fits
    assert "does not fit 22.4 GiB" in p.message and "frozen weights 22.2" in p.message
    assert "Smallest change that fits: FSDP over 2 GPUs" in p.message
    v = M.plan(M.model_setup("hunyuan-video", resolution=(720, 1280), frames=33), 24e9 / M.GIB)
    assert not v.fits and "a GPU with" in v.message


def test_tokens_follow_patch_and_downscale():
    assert M.model_setup("flux.1-dev").tokens() == (4096, 512)  # 1024^2 / 8 / 2 = 64^2
    assert M.model_setup("hunyuan-video", resolution=(720, 1280), frames=33).tokens() == (45 * 80 * 9, 256)
    s = M.setup_from_params("flux", 12_000_000_000)
    assert s.arch.double_blocks == 19 and s.arch.params == 12_000_000_000


@pytest.mark.parametrize("change,message", [
    (dict(mode="lora", lora_rank=0), "LoRA rank must be a positive integer"),
    (dict(mode="lora", lora_rank=-4), "LoRA rank must be a positive integer"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(resolution=(0, 512)), "resolution must be two positive integers"),
    (dict(frames=-1), "frames must be a positive integer"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(mode="qlora"), "mode must be 'full' or 'lora'"),
    (dict(sharding="fsdp"), "needs gpus > 1"),
    (dict(arch=replace(M.MODELS["flux.1-dev"], family="wan")), "unknown family 'wan'"),
    (dict(arch=replace(M.MODELS["flux.1-dev"], width=-3072)), "width must be a positive integer"),
])
def test_bad_input(change, message):
    s = replace(M.model_setup("flux.1-dev"), **change)
    with pytest.raises(ValueError, match=message):
        M.predict(s)


def test_bad_input_to_helpers():
    with pytest.raises(ValueError, match="unknown model"):
        M.model_setup("sdxl")
    with pytest.raises(ValueError, match="unknown family"):
        M.setup_from_params("sdxl", 2_600_000_000)
    with pytest.raises(ValueError, match="params must be a positive integer"):
        M.setup_from_params("flux", 0)
    with pytest.raises(ValueError, match="budget must be positive"):
        M.plan(M.model_setup("demo"), 0)
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        M.plan(M.model_setup("demo"), 24, lora_rank=0)


def test_the_wording_fits_a_cpu_run_and_small_figures():
    """A CPU run's figures are per process, small ones in MiB (never "0.0 GiB"), and the advice is the budget."""
    tiny = M.model_setup("demo", resolution=(32, 32), batch=16, dtype="fp32", device="cpu")
    refused = M.plan(tiny, 1e-4).message
    fits = M.plan(tiny, 2).message
    for text in (refused, fits):
        assert "per GPU" not in text and "0.0 GiB" not in text and "a GPU with" not in text, text
        assert "per process" in text and " MiB" in text, text
    assert "does not fit 0.0001 GiB per process" in refused
    assert "Smallest change that fits: 48.2 MiB of memory per process (raise the memory budget)." in refused
    assert M.size(0) == "0 B" and M.size(1536) == "1.5 KiB" and M.size(3 * M.GIB) == "3 GiB"


def test_the_wording_of_a_gpu_plan_is_per_gpu_and_never_asks_for_a_tiny_gpu():
    tiny = M.model_setup("demo", resolution=(32, 32), batch=16, dtype="fp32", device="cuda")
    refused = M.plan(tiny, 1e-4).message
    assert "per GPU" in refused and "per process" not in refused and "0.0 GiB" not in refused
    assert "a GPU with" not in refused and "of GPU memory (raise the memory budget)" in refused
    assert "1.09 GiB per GPU (tensors 316 MiB" in M.plan(tiny, 2).message
    big = M.plan(M.model_setup("hunyuan-video", resolution=(720, 1280), frames=33), 24e9 / M.GIB).message
    assert "per GPU" in big and re.search(r"a GPU with \d{2,} GiB", big), big
