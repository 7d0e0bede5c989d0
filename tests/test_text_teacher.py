"""The text-conditioned demo teacher (SD3-shaped, xslim_demo/text_teacher.py): its prompts and vocabulary, its two
files (diffusers keys + the text encoder beside them), training through the shared demo trainer, the shipped
weights drawing the class a prompt names, and 1.x-Distill with LoRA on it from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from xslim_demo import text_teacher as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = tt.default_weights_path()


def test_prompts_are_word_ids_with_unknown_words_marked_and_the_empty_prompt_all_padding():
    vocab = tt.vocabulary()
    ids = tt.tokenize(["an ankle boot", "a photo of a flying car", ""], vocab)
    assert ids.shape == (3, tt.TEXT_LENGTH) and ids.dtype == torch.long
    assert [vocab[i] for i in ids[0, :3]] == ["an", "ankle", "boot"] and ids[0, 3:].eq(0).all()
    assert [vocab[i] for i in ids[1, :6]] == ["a", "photo", "of", "a", "<unk>", "<unk>"]
    assert ids[2].eq(0).all()  # the unconditional prompt
    gen = torch.Generator().manual_seed(0)
    for label in range(10):
        prompt = tt.class_prompt(label, gen)
        assert any(name in prompt for name in tt.NAMES[label]) and "<unk>" not in [vocab[i] for i in tt.tokenize([prompt], vocab)[0]]
    assert tt.default_prompt(9) == "an ankle boot" and tt.default_prompt(7) == "a sneaker"


def _random_teacher(seed=0):
    torch.manual_seed(seed)
    vocab = tt.vocabulary()
    return tt.build_model().eval(), tt.TinyTextEncoder(len(vocab)).eval(), vocab


def test_the_files_keep_diffusers_keys_and_load_back_to_the_same_velocity(tmp_path):
    model, encoder, vocab = _random_teacher()
    path = str(tmp_path / "t.safetensors")
    tt.save_text_teacher(path, model, encoder, vocab, {"training_steps": 3})
    assert os.path.exists(tt.encoder_path(path))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "transformer_blocks.0.attn.add_q_proj.weight" in keys and "pos_embed.proj.weight" in keys  # diffusers names
    assert meta["family"] == "sd3" and json.loads(meta["architecture"])["num_layers"] == 4
    loaded = tt.load_text_teacher(path)
    x, sigma = torch.randn(2, *tt.LATENT_SHAPE), torch.tensor([0.8, 0.3])
    ids = tt.tokenize(["a sneaker", ""], vocab)
    with torch.no_grad():
        assert torch.equal(tt.velocity(model, encoder, x, sigma, ids), tt.velocity(loaded.model, loaded.encoder, x, sigma, ids))


def test_a_file_of_another_kind_or_a_damaged_one_is_refused_naming_it(tmp_path):
    from xslim_demo.teacher import default_weights_path

    with pytest.raises(ValueError, match="is not a xslim-demo-text-teacher/1 file"):
        tt.load_text_teacher(default_weights_path())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="bad.safetensors could not be read as safetensors"):
        tt.load_text_teacher(str(bad))


def test_the_demo_trainer_trains_the_text_teacher_and_resumes_exactly(tmp_path):
    """Two steps straight equal one step, a checkpoint, and one more (the shared trainer with the text recipe)."""
    from xslim_demo import data
    from xslim_demo.train import TextRecipe, TrainConfig, Trainer

    if not os.path.exists(os.path.join(data.DATA_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST is not installed: {data.INSTALL_HINT}")
    cfg = TrainConfig(batch_size=4, total_steps=2, checkpoint_every=1)
    torch.set_num_threads(1)
    straight = Trainer(cfg, str(tmp_path / "a"), TextRecipe())
    losses = [straight.train_step(), straight.train_step()]
    first = Trainer(cfg, str(tmp_path / "b"), TextRecipe())
    first.train_step()
    first.save()
    second = Trainer(cfg, str(tmp_path / "b"), TextRecipe())
    assert second.resume() and second.step == 1
    assert second.train_step() == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the text demo teacher weights are not built yet")
def test_the_shipped_text_teacher_draws_the_class_its_prompt_names():
    from xslim_demo.classifier import load_classifier
    from xslim_demo.grid import class_noise
    from xslim_demo.latents import latent_to_image
    from xslim_demo.sampling import flow_sigmas, sample_euler

    teacher = tt.load_text_teacher()
    noise, labels = class_noise(per_class=5, seed=123)
    # the second name of each class where it has one, in another template: not only the default prompts
    prompts = [f"a photo of {tt.article(n)} {n}" for n in (tt.NAMES[int(y)][-1] for y in labels)]
    with torch.no_grad():
        latents = sample_euler(teacher.velocity_fn(prompts), noise.squeeze(2), flow_sigmas(20, tt.SAMPLING_SHIFT), cfg_scale=3.0)
        clf, _ = load_classifier()
        accuracy = (clf.logits(latent_to_image(latents.unsqueeze(2))).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.7  # a sanity bound at 20 steps; the card's figures come from the evaluation


def _distil(tmp_path, launcher: list[str], iterations: int = 3):
    """A LoRA run on the shipped text teacher (cache co-training of blocks 1..2) with ``launcher``; its output."""
    config = {"run_dir": str(tmp_path / "run"), "teacher_loader": "xslim_demo.distill:load_demo_text_teacher",
              "lora_rank": 8, "iterations": iterations, "batch_size": 4, "checkpoint_every": iterations,
              "preview_every": iterations, "threads": 1, "device": "cpu",
              "stage1": {"steps": 2, "lr_student": 4e-4, "lr_fake": 3.2e-3, "cache_first": 1, "cache_last": 2}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, *launcher, "-m", "distill_core.train", "--config", str(tmp_path / "run.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the text demo teacher weights are not built yet")
def test_the_text_teacher_distils_with_lora_from_the_command_line(tmp_path):
    """The text path end to end on a trained model: prompts encoded by its own encoder, the student and the fake
    score as LoRA adapters on the one base, cache co-training of blocks 1..2, a student file that loads."""
    from distill_core.student import load_student

    out = _distil(tmp_path, [])
    assert "done at iteration 3" in out.stdout
    student = load_student(str(tmp_path / "run" / "student.safetensors"), base_family="sd3")
    assert student.effective_nfe == pytest.approx(1 + 2 / 4)
    assert os.path.exists(tmp_path / "run" / "previews" / "00003.png")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the text demo teacher weights are not built yet")
def test_the_text_teacher_distils_under_torchrun_with_two_processes(tmp_path):
    from distill_core.student import load_student

    out = _distil(tmp_path, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], iterations=2)
    assert out.stdout.count("done at iteration 2") == 1  # said once, by rank 0
    assert load_student(str(tmp_path / "run" / "student.safetensors"), base_family="sd3").effective_nfe == pytest.approx(1.5)
