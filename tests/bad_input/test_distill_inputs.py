"""Bad input to 1.x-Distill on any family (issue 'distil any supported model family'): prompt files that are
empty or not text, a prompt set of another text encoder, a LoRA rank <= 0, a cached block range outside the
model, a resume with a changed base model. Each is refused with a message naming the problem, before anything
trains, and nothing in the run folder is lost."""

from __future__ import annotations

import os

import pytest
import torch

from distill_core.conditioning import PromptSet, encode_prompt_set, read_prompt_file
from distill_core.config import RunConfig
from distill_core.jobfiles import ResumeRefused
from distill_core.nets import SharedLora
from distill_core.runtime import run_training
from test_distill_families import LOADER, fake_text_encoder, tiny_sd3

CLEAR = pytest.mark.bad_input("clear error")


@pytest.fixture()
def sd3(tmp_path):
    torch.manual_seed(0)
    module, shape, _ = tiny_sd3()
    module.save_pretrained(str(tmp_path / "sd3"), safe_serialization=True)
    encode_prompt_set(["a red cube", "a blue sphere"], fake_text_encoder()).save(str(tmp_path / "prompts.safetensors"))

    def config(**changes):
        cfg = dict(run_dir=str(tmp_path / "run"), teacher=str(tmp_path / "sd3"), teacher_loader=LOADER,
                   teacher_options={"latent_shape": list(shape)}, prompts=str(tmp_path / "prompts.safetensors"), lora_rank=2,
                   iterations=2, batch_size=2, checkpoint_every=1, preview_every=0, threads=1)
        cfg.update(changes)
        return RunConfig(**cfg)

    return tmp_path, config


@CLEAR
@pytest.mark.parametrize("content,message", [
    (b"", "holds no prompts"),
    (b"\n   \n# a comment only\n", "holds no prompts"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    ("caf\xe9 au lait\n".encode("latin-1"), "not UTF-8 text"),
])
def test_a_prompt_file_that_is_empty_or_not_text_is_refused(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_prompt_file(str(path))
    assert str(path) in str(err.value)


@CLEAR
def test_a_text_file_given_as_a_prompt_set_is_refused(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match="not a readable prompt-set file"):
        PromptSet.load(str(tmp_path / "prompts.txt"))


@CLEAR
def test_a_prompt_set_of_another_text_encoder_is_refused_before_training(sd3):
    root, config = sd3
    encode_prompt_set(["a red cube"], fake_text_encoder(width=40)).save(str(root / "wide.safetensors"))
    with pytest.raises(ValueError, match="encoded 40 wide but the sd3 model takes text conditioning 24 wide"):
        run_training(config(prompts=str(root / "wide.safetensors")))
    encode_prompt_set(["a red cube"], fake_text_encoder(pooled=8)).save(str(root / "pooled.safetensors"))
    with pytest.raises(ValueError, match="pooled vectors are 8 wide but the sd3 model takes 16"):
        run_training(config(prompts=str(root / "pooled.safetensors")))
    assert not os.path.exists(root / "run" / "state.safetensors")


@CLEAR
@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_a_lora_rank_below_one_is_refused(tmp_path, rank):
    with pytest.raises(ValueError, match="LoRA rank must be a whole number > 0"):
        SharedLora(torch.nn.Linear(2, 2), rank)
    if rank != 0:  # 0 is valid in a run config: full copies instead of LoRA
        with pytest.raises(ValueError, match="lora_rank must be a whole number >= 1 for LoRA, or 0"):
            RunConfig(run_dir=str(tmp_path), lora_rank=rank)


@CLEAR
def test_a_cached_range_outside_the_model_is_refused(sd3):
    _, config = sd3
    with pytest.raises(ValueError, match="cache range 2..5 exceeds the model's 3 blocks"):
        run_training(config(stage1={"cache_first": 2, "cache_last": 5}))


@CLEAR
def test_a_resume_with_a_changed_base_model_is_refused_and_the_checkpoint_kept(sd3):
    root, config = sd3
    assert run_training(config())["status"] == "done"
    before = (root / "run" / "state.safetensors").read_bytes()
    from diffusers import SD3Transformer2DModel

    changed = SD3Transformer2DModel.from_pretrained(str(root / "sd3"))
    with torch.no_grad():
        changed.proj_out.weight.mul_(1.05)
    changed.save_pretrained(str(root / "sd3"), safe_serialization=True)
    with pytest.raises(ResumeRefused, match="base model: sd3 \\(hash [0-9a-f]+\\) -> sd3 \\(hash [0-9a-f]+\\)"):
        run_training(config(iterations=4))
    assert (root / "run" / "state.safetensors").read_bytes() == before


@pytest.mark.bad_input("survived")
def test_the_block_cache_composes_with_a_foreign_instance_forward_and_restores_it_exactly(tmp_path):
    from distill_core.cache import CacheRange, recording, replaying
    from distill_core.student import blocks_of
    from xslim_demo.distill import load_demo_teacher
    from xslim_lab.tiny import write_tiny_teacher

    net = (teacher := load_demo_teacher(write_tiny_teacher(str(tmp_path / "teacher.safetensors")))).flow
    g = torch.Generator().manual_seed(0)
    x, cond, sigma = torch.randn(2, 16, 1, 8, 8, generator=g), teacher.prompts.batch(torch.tensor([1, 2])), torch.full((2,), 0.75)
    cache, blocks = CacheRange(1, 2), [spec.module for spec in blocks_of(net)]
    full = net(x, sigma, cond)
    calls, theirs = {1: 0, 2: 0}, {}
    for i in (1, 2):  # someone else's instance forward (a profiler, another tool) on the first and last cached block
        def foreign(*a, _i=i, _inner=blocks[i].forward, **k):
            calls[_i] += 1
            return _inner(*a, **k)

        blocks[i].forward = theirs[i] = foreign
    try:
        with recording(blocks_of(net), cache) as store:
            assert torch.equal(net(x, sigma, cond), full)
        assert calls == {1: 1, 2: 1}  # theirs ran inside ours
        assert all(blocks[i].__dict__["forward"] is theirs[i] for i in (1, 2))  # and is back exactly
        with replaying(blocks_of(net), cache, dict(store), None):
            torch.testing.assert_close(net(x, sigma, cond), full, rtol=1e-5, atol=1e-5)  # replay of the same input
        assert calls == {1: 1, 2: 1}  # the skipped range ran nothing, theirs included
        with pytest.raises(RuntimeError, match="interrupted"), recording(blocks_of(net), cache):
            raise RuntimeError("interrupted")
        assert all(blocks[i].__dict__["forward"] is theirs[i] for i in (1, 2))  # also after an error
        assert torch.equal(net(x, sigma, cond), full) and calls == {1: 2, 2: 2}
    finally:
        for i in (1, 2):
            blocks[i].__dict__.pop("forward", None)


# -- header fields validated like configs (second round) --------------------------------------------------------
def _with_meta(src: str, dst, **changes) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: v for k, v in changes.items() if not k.startswith("tensor:")})
    for key, value in changes.items():
        if key.startswith("tensor:"):
            tensors[key[len("tensor:"):]] = value
    save_file(tensors, str(dst), meta)
    return str(dst)


@pytest.mark.bad_input("clear error")
@pytest.mark.parametrize("field,value,message", [
    ("latent_shape", "[16, -1, 8, 8]", "latent_shape .* must be 2 to 5 whole numbers"),
    ("latent_shape", "[16, 1, 100000, 100000]", "must be 2 to 5 whole numbers from 1 to 4096"),
    ("latent_shape", '["16", 1, 8, 8]', "must be 2 to 5 whole numbers"),
    ("latent_shape", "16", "must be 2 to 5 whole numbers"),
    ("latent_shape", "[16]", "must be 2 to 5 whole numbers"),
    ("sigmas", "[1.0, 2.0]", "strictly decreasing"),
    ("sigmas", "[5.0, 0.0]", "from 1 down to 0"),
    ("sigmas", "[1.0, -0.5]", "from 1 down to 0"),
    ("sigmas", '[1.0, "0"]', "from 1 down to 0"),
    ("call_extra", "[1, 2]", "call_extra must be a JSON object"),
    ("call_extra", '{"guidance": "high"}', "call_extra.guidance must be a finite number"),
    ("call_extra", '{"guidance": NaN}', "call_extra.guidance must be a finite number"),
    ("call_extra", '{"grid": [0, 8]}', "call_extra.grid must be two whole numbers"),
    ("call_extra", '{"grid": "8x8"}', "call_extra.grid must be two whole numbers"),
])
def test_a_students_latent_shape_sigmas_and_call_extra_are_checked(tmp_path, field, value, message):
    from distill_core.student import load_student

    path = _with_meta("distill_core/weights/student_1x_175.safetensors", tmp_path / "s.safetensors", **{field: value})
    with pytest.raises(ValueError, match=message):
        load_student(path)


@pytest.mark.bad_input("clear error")
def test_a_student_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    from safetensors import safe_open

    from distill_core.student import load_student

    src = "distill_core/weights/student_1x_175.safetensors"
    with safe_open(src, framework="pt") as f:
        name = next(k for k in f.keys() if k.startswith("model.") and f.get_slice(k).get_shape())
        bad = f.get_tensor(name).clone()
    bad.view(-1)[0] = float("nan")
    path = _with_meta(src, tmp_path / "nan.safetensors", **{f"tensor:{name}": bad})
    with pytest.raises(ValueError, match=f"tensor {name} holds NaN"):
        load_student(path)


@pytest.mark.bad_input("clear error")
@pytest.mark.parametrize("prompts,message", [
    ("{not json", "'prompts' metadata is not JSON"),
    ('"a single string"', "must be a list of prompt texts, got str"),
    ("[1, 2, 3]", "must be a list of prompt texts, got list"),
])
def test_prompt_set_metadata_that_is_not_a_list_of_texts_is_refused_naming_the_file(tmp_path, prompts, message):
    import torch

    from distill_core.conditioning import Conditioning, PromptSet

    good = PromptSet(["a", "b", "c"], Conditioning(torch.zeros(3, 2, 4), torch.zeros(3, 5)), Conditioning(torch.zeros(1, 2, 4), torch.zeros(1, 5)))
    good.save(str(tmp_path / "p.safetensors"))
    path = _with_meta(str(tmp_path / "p.safetensors"), tmp_path / "bad.safetensors", prompts=prompts)
    with pytest.raises(ValueError, match=f"bad.safetensors: .*{message}"):
        PromptSet.load(path)
