"""The demo teacher behind 1.x-Distill's model protocol: a HunyuanVideo-family ``FlowModel`` whose "prompt list"
is its class names and whose "text encoder" is its class table (the last row is the unconditional prompt)."""

from __future__ import annotations

import torch

from distill_core.conditioning import Conditioning, PromptSet
from distill_core.models import FlowModel, Teacher
from distill_core.student_file import file_hash, file_signature

from .grid import class_noise, images_to_grid
from .latents import LATENT_SHAPE, latent_to_image
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
