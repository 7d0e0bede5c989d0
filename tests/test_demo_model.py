"""The demo teacher's file format, latent transform and data loading, plus the shipped weights themselves."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from xslim_demo import latents, teacher
from xslim_demo.teacher import ARCHITECTURE, ClassConditioner, build_model, load_teacher, save_teacher

SMALL = {**ARCHITECTURE, "num_layers": 1, "num_single_layers": 2}


def small_teacher(tmp_path, seed=0):
    torch.manual_seed(seed)
    model, cond = build_model(SMALL).eval(), ClassConditioner()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = str(tmp_path / "teacher.safetensors")
    save_teacher(path, model, cond, {"training_steps": 0})
    return model, cond, path


def test_latent_transform_is_invertible_and_keeps_every_pixel():
    images = torch.rand(5, 1, 28, 28)
    lat = latents.image_to_latent(images)
    assert lat.shape == (5, *latents.LATENT_SHAPE)
    torch.testing.assert_close(latents.latent_to_image(lat), images, rtol=0, atol=1e-6)  # x*2-1 and back: float rounding
    assert torch.equal(torch.sort(lat[:, :, 0].flatten(1)).values[:, -784:], torch.sort(images.flatten(1) * 2 - 1).values)


def test_saved_teacher_uses_comfyui_key_names_and_loads_back_identically(tmp_path):
    model, cond, path = small_teacher(tmp_path)
    keys = set(load_file(path))
    assert "txt_in.individual_token_refiner.blocks.0.norm1.weight" in keys  # ComfyUI's HunyuanVideo probe key
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.1.linear1.weight" in keys
    loaded = load_teacher(path)
    x = torch.randn(2, *latents.LATENT_SHAPE)
    labels = torch.tensor([3, 10])
    expected = teacher.velocity(model, cond, x, 0.7, labels)
    got = teacher.velocity(loaded.model, loaded.conditioner, x, 0.7, labels)
    assert torch.equal(got, expected)
    assert loaded.meta["family"] == "hunyuan_video" and loaded.meta["training_steps"] == "0"


def test_a_corrupt_weight_file_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        load_teacher(str(bad))


def test_a_mismatched_weight_file_is_refused_naming_the_tensor(tmp_path):
    _, _, path = small_teacher(tmp_path)
    tensors = load_file(path)
    tensors["double_blocks.0.img_mlp.0.weight"] = tensors["double_blocks.0.img_mlp.0.weight"][:-1]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=r"double_blocks.0.img_mlp.0.weight has shape \(511, 128\), the architecture needs 512 rows"):
        load_teacher(path)
    del tensors["double_blocks.0.img_mlp.0.weight"]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="does not match its declared architecture: missing tensor"):
        load_teacher(path)


def test_a_file_of_another_kind_is_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something"})
    with pytest.raises(ValueError, match="is not an X-Slim demo teacher"):
        load_teacher(str(other))


def test_missing_dataset_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    from xslim_demo import data

    data = importlib.reload(data)
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            data.load_split("train")
    finally:
        monkeypatch.delenv("FASHION_MNIST_DIR")
        importlib.reload(data)


SHIPPED = teacher.default_weights_path()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the demo teacher weights are not built yet")
def test_shipped_teacher_draws_recognisable_classes():
    from xslim_demo.classifier import load_classifier
    from xslim_demo.grid import class_noise
    from xslim_demo.sampling import flow_sigmas, sample_euler

    t = load_teacher()
    assert os.path.getsize(SHIPPED) < 50e6
    noise, labels = class_noise(per_class=5, seed=123)
    with torch.no_grad():
        images = latents.latent_to_image(sample_euler(t.velocity_fn(labels), noise, flow_sigmas(20), cfg_scale=3.0))
        clf, _ = load_classifier()
        accuracy = (clf.logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.7  # a sanity bound at 20 steps; the 50-step figures come from the benchmark


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="the demo teacher weights are not built yet")
def test_teacher_evaluation_prints_one_row_per_cfg_scale(capsys):
    from xslim_lab import demo_evaluate as evaluate

    evaluate.main(["--images", "10", "--steps", "3", "--cfg", "1.5", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| teacher")]
    assert [line.split("|")[1].strip() for line in lines] == ["teacher 3 steps, CFG 1.5", "teacher 3 steps, CFG 3"]
    for line in lines:
        accuracy, fd = (float(v) for v in line.split("|")[2:4])
        assert 0.0 <= accuracy <= 1.0 and fd > 0
