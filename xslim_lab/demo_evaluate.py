"""The demo teacher's own quality, in the shipped classifier's feature space.

    python -m xslim_lab.demo_evaluate --images 200 --steps 50 --cfg 2 3 4

Prints per CFG scale: class accuracy, FD-FMNIST, precision, recall and within-class diversity of samples
drawn with fixed seeds (the same images per class for every scale), next to the same figures for real
test images, which bound what the classifier can certify.
"""

from __future__ import annotations

import argparse

import torch

from .metrics import DistributionMetrics
from xslim_demo.sampling import flow_sigmas, sample_euler
from xslim_demo.classifier import load_classifier
from xslim_demo.data import load_split
from xslim_demo.grid import class_noise
from xslim_demo.latents import latent_to_image
from xslim_demo.teacher import CLASSES, load_teacher


@torch.no_grad()
def teacher_samples(teacher, per_class: int, steps: int, cfg: float, seed: int = 0, batch: int = 100):
    noise, labels = class_noise(per_class, seed)
    images = []
    for i in range(0, len(labels), batch):
        fn = teacher.velocity_fn(labels[i : i + batch])
        images.append(latent_to_image(sample_euler(fn, noise[i : i + batch], flow_sigmas(steps), cfg_scale=cfg)))
    return torch.cat(images), labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="samples in all (a multiple of 10)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--classifier", default=None, help="classifier file (default: the shipped one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = load_teacher()
    classifier, reference = load_classifier(args.classifier)
    metrics = DistributionMetrics(classifier, reference)
    rows = []
    try:
        x, y = load_split("test")
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[: args.images]
        rows.append(("real test images", metrics(x[pick], y[pick])))
    except FileNotFoundError as err:  # the dataset package is optional here
        print(f"(real-image row skipped: {err})")
    for cfg in args.cfg:
        images, labels = teacher_samples(teacher, args.images // len(CLASSES), args.steps, cfg)
        rows.append((f"teacher {args.steps} steps, CFG {cfg:g}", metrics(images, labels)))
    print("| samples | accuracy | FD | precision | recall | diversity |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['accuracy']:.3f} | {m['fd']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} | {m['diversity']:.3f} |")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
