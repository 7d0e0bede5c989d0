"""`make demo`: sample with and without X-Slim on the shipped demo teacher and show what it saved.

The demo teacher is a class-conditional rectified-flow DiT (HunyuanVideo architecture, 12 blocks) trained on
Fashion-MNIST and shipped with the pack (xslim_demo). The demo samples one image per class and
seed with full 50-step sampling and with X-Slim's slow and fast presets, prints effective NFE, block
evaluations, wall-clock speedup, PSNR against full sampling and the classifier's accuracy, and writes the
images side by side to demo.png.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from xslim_core import preset_config, record_profile
from xslim_demo import latent_to_image, load_teacher
from xslim_demo.classifier import load_classifier
from xslim_demo.grid import class_noise, images_to_grid
from xslim_core.engine import run_cached
from .metrics import paired_fidelity
from xslim_demo.sampling import flow_sigmas, sample_euler
from .timing import alternating_times, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--per-class", type=int, default=2, help="images per class")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--out", default="demo.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    teacher = load_teacher()
    classifier, _ = load_classifier()
    sigmas = flow_sigmas(args.steps)
    noise, labels = class_noise(args.per_class, seed=2024)
    sample = partial(sample_euler, teacher.velocity_fn(labels), noise, sigmas, cfg_scale=args.cfg)
    blocks = len(teacher.model.transformer_blocks) + len(teacher.model.single_transformer_blocks)
    print(f"Demo teacher: {blocks} blocks (HunyuanVideo architecture, trained {teacher.meta.get('training_steps')} "
          f"steps on Fashion-MNIST); {len(labels)} images, {args.steps} Euler steps, CFG {args.cfg}.")

    with torch.inference_mode():
        reference = sample()
        profile = record_profile(teacher.model, sample, sigmas)
        settings = {"X-Slim slow": preset_config("slow"), "X-Slim fast": preset_config("fast")}
        results = {name: run_cached(teacher.model, cfg, profile, sigmas, sample) for name, cfg in settings.items()}
        runs = {"full": sample, **{n: partial(run_cached, teacher.model, c, profile, sigmas, sample) for n, c in settings.items()}}
        times = {name: median(t) for name, t in alternating_times(runs, args.repeats).items()}
        ref_images = latent_to_image(reference)
        accuracy = lambda images: (classifier.logits(images).argmax(1) == labels).float().mean().item()

        full_evals = args.steps * blocks
        print(f"\n{'setting':14} {'eff. NFE':>8} {'block evals':>11} {'blocks x':>8} {'wall x':>7} {'PSNR dB':>8} "
              f"{'SSIM':>6} {'acc':>5}  decisions")
        print(f"{'full':14} {args.steps:8.1f} {full_evals:11d} {1:8.2f} {1:7.2f} {'-':>8} {'-':>6} "
              f"{accuracy(ref_images):5.2f}")
        rows = [ref_images]
        for name, (out, stats) in results.items():
            images = latent_to_image(out)
            rows.append(images)
            fid = paired_fidelity(images, ref_images)
            evals = stats.effective_nfe * blocks  # per image
            print(f"{name:14} {stats.effective_nfe:8.1f} {evals:11.1f} {full_evals / evals:8.2f} "
                  f"{times['full'] / times[name]:7.2f} {fid['psnr']:8.2f} {fid['ssim']:6.3f} {accuracy(images):5.2f}  "
                  f"{stats.pattern()}")
    print(f"\nWall-clock: median of {args.repeats} interleaved runs; full run {times['full']:.2f} s on "
          f"{torch.get_num_threads()} CPU threads. Decisions: F full, B block refresh, T token refresh, . skipped.")
    print(results["X-Slim fast"][1].summary())
    first = [int((labels == c).nonzero()[0]) for c in range(10)]
    images_to_grid(torch.cat([r[first] for r in rows]), len(rows), ["full 50", "X-Slim slow", "X-Slim fast"]).save(args.out)
    print(f"Side by side (rows: full, slow, fast): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
