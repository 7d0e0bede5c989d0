"""The text demo teacher and its students, measured in the shipped Fashion-MNIST classifier's feature space.

    python -m xslim_lab.text_teacher_evaluate [--images 200] [--seed 2026] [--steps 50] [--cfg 3]
        [--student NAME=PATH ...] [--out DIR]

Every row samples the same noise with the same prompts: each class's default prompt ("a sneaker"), ``--images`` /
10 per class. Rows: the teacher at ``--steps`` Euler steps with CFG (the reference), the teacher at 2 steps with
CFG, the teacher at 2 steps without CFG (what a 2-step student is at the start of distillation: it begins as the
teacher and samples without CFG) and each student file (its own sampler, no CFG). Figures: NFE, class accuracy, FD-FMNIST, within-class diversity, recall, and how
close each row's images are to the reference's from the same noise (median and 5th-percentile PSNR over images).
With ``--out``: results.md, results.json and a grid (one sample per class and row).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from distill_core.conditioning import Conditioning
from distill_core.student import load_student
from xslim_demo import text_teacher as tt
from xslim_demo.classifier import load_classifier
from xslim_demo.grid import class_noise, images_to_grid
from xslim_demo.latents import latent_to_image
from xslim_demo.sampling import flow_sigmas, sample_euler

from .metrics import DistributionMetrics

log = logging.getLogger("xslim.text_teacher_evaluate")


@torch.no_grad()
def teacher_images(teacher: tt.TextTeacher, noise: torch.Tensor, prompts: list[str], steps: int, cfg: float | None):
    latents = sample_euler(teacher.velocity_fn(prompts), noise, flow_sigmas(steps, tt.SAMPLING_SHIFT), cfg_scale=cfg)
    return latent_to_image(latents.unsqueeze(2))


@torch.no_grad()
def student_images(path: str, teacher: tt.TextTeacher, noise: torch.Tensor, prompts: list[str]):
    student = load_student(path, base_family="sd3")
    context, pooled = teacher.encode(prompts)
    return student.effective_nfe, latent_to_image(student.sample(noise, Conditioning(context, pooled)).unsqueeze(2))


def measure(metric: DistributionMetrics, images, labels, reference) -> dict:
    out = {k: float(v) for k, v in metric(images, labels).items()}
    mse = (images.float().clamp(0, 1) - reference.float().clamp(0, 1)).square().mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)  # per image; identical -> 100
    out["psnr_median"], out["psnr_p5"] = float(psnr.median()), float(torch.quantile(psnr, 0.05))
    return out


def evaluate(images: int, seed: int, steps: int, cfg: float, students: dict[str, str], path: str | None = None) -> dict:
    teacher = tt.load_text_teacher(path)
    noise, labels = class_noise(images // 10, seed=seed)
    noise = noise.squeeze(2)
    prompts = [tt.default_prompt(int(y)) for y in labels]
    classifier, reference_stats = load_classifier()
    metric = DistributionMetrics(classifier, reference_stats)
    rows, pictures = [], []
    started = time.time()
    reference = teacher_images(teacher, noise, prompts, steps, cfg)
    baselines = [
        (f"teacher {steps} steps, CFG {cfg:g}", 2.0 * steps, reference),
        (f"teacher 2 steps, CFG {cfg:g}", 4.0, teacher_images(teacher, noise, prompts, 2, cfg)),
        # a 2-step student starts as the teacher (its LoRA adapters at zero), sampling without CFG
        ("teacher 2 steps, no CFG (the student at the start)", 2.0, teacher_images(teacher, noise, prompts, 2, None)),
    ]
    for name, nfe, imgs in baselines:
        rows.append({"name": name, "nfe": nfe, **measure(metric, imgs, labels, reference)})
        pictures.append(imgs)
    for name, file in students.items():
        nfe, imgs = student_images(file, teacher, noise, prompts)
        rows.append({"name": name, "nfe": nfe, "file": file, **measure(metric, imgs, labels, reference)})
        pictures.append(imgs)
    return {"images": images, "seed": seed, "steps": steps, "cfg": cfg, "rows": rows, "labels": labels,
            "pictures": pictures, "seconds": time.time() - started}


def format_table(rows: list[dict]) -> str:
    head = "| row | NFE | accuracy | FD | diversity | recall | PSNR vs reference, median / p5 |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        close = "reference" if r is rows[0] else f"{r['psnr_median']:.2f} / {r['psnr_p5']:.2f}"
        lines.append(f"| {r['name']} | {r['nfe']:.2f} | {r['accuracy']:.3f} | {r['fd']:.2f} | {r['diversity']:.4f} | "
                     f"{r['recall']:.3f} | {close} |")
    return "\n".join(lines)


def write_outputs(result: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    labels = result["labels"]
    per_class = len(labels) // 10
    first = torch.arange(0, len(labels), per_class)
    grid = torch.cat([imgs[first] for imgs in result["pictures"]])
    images_to_grid(grid, len(result["pictures"]), [str(i + 1) for i in range(len(result["pictures"]))]).save(
        os.path.join(out, "grid.png"))
    md = (f"{result['images']} images ({result['images'] // 10} per class, each class's default prompt), noise seed "
          f"{result['seed']}, the same noise for every row; PSNR against the first row's image from the same noise. "
          f"Wall time {result['seconds']:.0f} s.\n\n" + format_table(result["rows"]) + "\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k not in ("labels", "pictures")}, f, indent=1)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xslim_lab.text_teacher_evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images in all, a multiple of 10 (default 200)")
    parser.add_argument("--seed", type=int, default=2026, help="noise seed (default 2026)")
    parser.add_argument("--steps", type=int, default=50, help="the reference teacher's Euler steps (default 50)")
    parser.add_argument("--cfg", type=float, default=3.0, help="the teacher's CFG scale (default 3)")
    parser.add_argument("--student", action="append", default=[], metavar="NAME=PATH", help="a student file to add as a row")
    parser.add_argument("--teacher", default=None, help="the text teacher file (default: the shipped one)")
    parser.add_argument("--out", default=None, help="folder for results.md / results.json / grid.png")
    args = parser.parse_args(argv)
    if args.images < 10 or args.images % 10:
        parser.error(f"--images must be a positive multiple of 10 (the same count of each class), got {args.images}")
    students = {}
    for item in args.student:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            parser.error(f"--student takes NAME=PATH with an existing student file, got {item!r}")
        students[name] = path
    result = evaluate(args.images, args.seed, args.steps, args.cfg, students, args.teacher)
    text = write_outputs(result, args.out) if args.out else format_table(result["rows"])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
