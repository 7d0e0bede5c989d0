"""Sample a class grid from a student file (the sampler configures itself from the file's metadata).

    python -m xslim_lab.distill_sample --student distill_core/weights/student_1x_175.safetensors --out grid.png [--base TEACHER]

With ``--base`` (default: the shipped demo teacher) a student distilled from other weights is refused.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xslim_demo.grid import class_noise, images_to_grid
from xslim_demo.latents import latent_to_image
from xslim_demo.teacher import CLASSES, default_weights_path

from distill_core.student import file_hash, load_student


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=default_weights_path(), help="the base model file the student must match")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        student = load_student(args.student, base_hash=file_hash(args.base))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    noise, labels = class_noise(args.per_class, args.seed)
    images = latent_to_image(student.sample(noise, labels))
    images_to_grid(images, len(CLASSES), CLASSES).save(args.out)
    print(f"{args.student}: {len(student.sigmas) - 1} steps, sigmas {student.sigmas}, cached blocks "
          f"{student.meta['cached_blocks']}, effective NFE {student.effective_nfe:.2f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
