"""The demo teachers behind 1.x-Distill's model protocol: the class teacher, a HunyuanVideo-family ``FlowModel``
whose "prompt list" is its class names and whose "text encoder" is its class table (the last row is the
unconditional prompt); and the text teacher, an SD3-family ``FlowModel`` whose prompts ("a sneaker") are encoded by
its own tiny text encoder (the empty prompt is the unconditional one)."""

from __future__ import annotations

import json

import torch

from distill_core.conditioning import Conditioning, PromptSet
from distill_core.models import FlowModel, Teacher
from distill_core.student_file import file_hash, file_signature

from .grid import class_noise, images_to_grid
from .latents import LATENT_SHAPE, latent_to_image
from . import text_teacher as tt
from .teacher import CLASSES, ClassConditioner, default_weights_path, load_teacher


def class_prompt_set(conditioner: ClassConditioner, classes: list[int] | None = None) -> PromptSet:
    rows = torch.tensor(classes if classes is not None else range(conditioner.null_class))
    table = Conditioning(conditioner.context.detach(), conditioner.pooled.detach())
    names = [CLASSES[i] if i < len(CLASSES) else f"class {i}" for i in rows.tolist()]
    return PromptSet(names, table.rows(rows), table.rows(torch.tensor([conditioner.null_class])), kind="demo classes")


def label_conditioning(conditioner: ClassConditioner, labels: torch.Tensor) -> Conditioning:
    context, pooled = conditioner(labels)
    return Conditioning(context, pooled)


def load_demo_teacher(path: str | None = None, classes: list[int] | None = None) -> Teacher:
    path = path or default_weights_path()
    teacher = load_teacher(path)
    flow = FlowModel(teacher.model, LATENT_SHAPE)
    base = {
        "family": teacher.meta.get("family", "unknown"),
        "hash": file_hash(path),
        "architecture": teacher.meta["architecture"],
        "signature": file_signature(path),
    }
    conditioner = teacher.conditioner

    def render(sample) -> "object":
        noise, labels = class_noise(4, seed=1234)
        images = latent_to_image(sample(noise, label_conditioning(conditioner, labels)))
        return images_to_grid(images, len(CLASSES), CLASSES)

    table = {"cond.context": conditioner.context.detach(), "cond.pooled": conditioner.pooled.detach()}
    return Teacher(flow, class_prompt_set(conditioner, classes), base, render, table)


def text_prompt_list() -> list[str]:
    """Every prompt the text teacher was trained on: each class name in each template, class-major."""
    prompts = []
    for names in tt.NAMES:
        for name in names:
            prompts += [t.format(a=tt.article(name), n=name) for t in tt.TEMPLATES]
    return prompts


def text_prompt_set(teacher: "tt.TextTeacher", prompts: list[str] | None = None) -> PromptSet:
    prompts = prompts or text_prompt_list()
    context, pooled = teacher.encode(prompts)
    null_context, null_pooled = teacher.encode([""])
    return PromptSet(prompts, Conditioning(context, pooled), Conditioning(null_context, null_pooled), kind="demo text")


def load_demo_text_teacher(path: str | None = None, prompts: list[str] | None = None) -> Teacher:
    """The SD3-shaped text teacher (``xslim_demo/text_teacher.py``) with its prompt set encoded by its own encoder
    (``prompts``: a list of your own; default: every prompt it was trained on)."""
    path = path or tt.default_weights_path()
    teacher = tt.load_text_teacher(path)
    flow = FlowModel(teacher.model, tt.LATENT_SHAPE)
    base = {
        "family": "sd3",
        "hash": file_hash(path),
        "architecture": json.dumps({"_class_name": type(teacher.model).__name__, **dict(teacher.model.config)}),
        "signature": file_signature(path),
        "name": "demo text teacher",
    }

    def render(sample) -> "object":
        noise, labels = class_noise(4, seed=1234)
        prompts = [tt.default_prompt(int(y)) for y in labels]
        context, pooled = teacher.encode(prompts)
        images = latent_to_image(sample(noise.squeeze(2), Conditioning(context, pooled)).unsqueeze(2))
        return images_to_grid(images, len(CLASSES), [tt.default_prompt(i) for i in range(len(CLASSES))])

    return Teacher(flow, text_prompt_set(teacher, prompts), base, render)
