"""Sample a grid from a student file (the sampler configures itself from the file's metadata).

    python -m xslim_lab.distill_sample --student distill_core/weights/student_1x_175.safetensors --out grid.png
    python -m xslim_lab.distill_sample --student run/student.safetensors --base models/flux/transformer \\
        --prompts prompts.safetensors --out grid.png

A demo-teacher student draws a class grid (``--base`` defaults to the shipped demo teacher). A text-family student
(SD3, FLUX, HunyuanVideo: a LoRA run on a diffusers transformer folder) needs ``--base``, the transformer folder it
was distilled from, and ``--prompts``, a prompt-set file (``python -m distill_core.prompts encode``); it draws one
row per prompt as a latent preview (the first three latent channels; no VAE decode here). A student distilled
from other weights is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from xslim_demo.grid import class_noise, images_to_grid
from xslim_demo.latents import latent_to_image
from xslim_demo.teacher import CLASSES, default_weights_path

from distill_core.conditioning import PromptSet
from distill_core.models import weights_hash
from distill_core.runtime import latent_tiles
from distill_core.student import Student, load_student


def base_hash(path: str) -> str:
    """The base model's hash as its student files record it: a weights file, or a diffusers transformer folder."""
    if not os.path.exists(path):
        raise ValueError(f"the base model {path} does not exist.")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"{path} is a whole diffusers pipeline; give its transformer folder ({os.path.join(path, 'transformer')}), "
                         "the one the student was distilled from.")
    return weights_hash(path)


def text_grid(student: Student, prompts_path: str | None, per_prompt: int, seed: int, max_prompts: int):
    """One row per prompt (at most ``max_prompts``), ``per_prompt`` samples each, as latent tiles."""
    family = student.meta.get("base_family", "?")
    if not prompts_path:
        raise ValueError(f"this is a {family} student, conditioned on text: give --prompts, a prompt-set file "
                         "(python -m distill_core.prompts encode ... writes one).")
    prompts = PromptSet.load(prompts_path)
    context, pooled = student.net.text_dims
    prompts.check_model(context, pooled, f"this {family} student")
    count = min(len(prompts), max_prompts)
    rows = torch.arange(count).repeat_interleave(per_prompt)
    noise = torch.randn(len(rows), *student.net.latent_shape, generator=torch.Generator().manual_seed(seed))
    latents = student.sample(noise, prompts.batch(rows))
    return latent_tiles(latents, rows=count), prompts.prompts[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=default_weights_path(),
                        help="the base model the student must match: the demo teacher's file (default) or a diffusers transformer folder")
    parser.add_argument("--prompts", help="a text-family student: the prompt-set file to sample (one row per prompt)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class (demo) or per prompt (text)")
    parser.add_argument("--max-prompts", type=int, default=8, help="a text-family student: the first N prompts of the set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        student = load_student(args.student, base_hash=base_hash(args.base))
        if student.class_table is not None:  # the demo teacher's classes
            noise, labels = class_noise(args.per_class, args.seed)
            images = latent_to_image(student.sample(noise, labels))
            images_to_grid(images, len(CLASSES), CLASSES).save(args.out)
            what = f"{len(CLASSES)} classes x {args.per_class}"
        else:
            image, shown = text_grid(student, args.prompts, args.per_class, args.seed, args.max_prompts)
            image.save(args.out)
            what = f"latent preview, one row per prompt: {shown}"
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.student}: {len(student.sigmas) - 1} steps, sigmas {student.sigmas}, cached blocks "
          f"{student.meta['cached_blocks']}, effective NFE {student.effective_nfe:.2f} -> {args.out} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
