"""X-Slim against what users would pick instead, on the shipped demo teacher, then timing on a
compute-bound model.

    python -m xslim_lab.bench [--images 200 --steps 50 --out docs/bench]

Same seeds, same model, one process. For every method: block evaluations per sample (counted by hooks on
the blocks, whatever cache runs), effective NFE, wall-clock speedup (interleaved runs, median), PSNR/SSIM
against full sampling, and FD-FMNIST, accuracy, precision/recall and diversity in the shipped classifier's
feature space. Writes a markdown table, a speed-fidelity Pareto plot and an image grid of the same seeds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import platform
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from xslim_core import XSlimConfig, preset_config, record_profile
from .demo_model import latent_to_image, load_teacher
from .demo_model.classifier import load_classifier
from .demo_model.grid import class_noise, images_to_grid
from xslim_core.engine import run_cached
from .metrics import DistributionMetrics, paired_fidelity
from .sampling import flow_sigmas, sample_euler
from .timing import BlockExecutions, alternating_times, median

CFG = 2.0


@dataclass
class Method:
    name: str
    group: str
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, labels) -> latents
    results: dict = field(default_factory=dict)


class TeacherBench:
    def __init__(self, steps: int):
        self.teacher = load_teacher()
        self.model = self.teacher.model
        self.steps = steps
        self.sigmas = flow_sigmas(steps)
        self.probes = [b.attn for b in list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)]
        self.num_blocks = len(self.probes)

    def plain(self, steps: int, noise, labels):
        return sample_euler(self.teacher.velocity_fn(labels), noise, flow_sigmas(steps), cfg_scale=CFG)

    def xslim(self, config: XSlimConfig, profile, noise, labels):
        sample = partial(self.plain, self.steps, noise, labels)
        latents, self.last_stats = run_cached(self.model, config, profile, self.sigmas, sample)
        return latents

    def diffusers_cache(self, make_config: Callable[[], object], noise, labels):
        """A diffusers cache through its own API: enable_cache, a cache context per call, disable_cache."""
        model, fn = self.model, self.teacher.velocity_fn(labels)

        def velocity(x, sigma):
            with model.cache_context("cfg"):
                return fn(x, sigma)

        model.enable_cache(make_config())
        try:
            return sample_euler(velocity, noise, self.sigmas, cfg_scale=CFG)
        finally:
            model.disable_cache()

    def calibrate_magcache(self, noise, labels) -> list[float]:
        from diffusers import MagCacheConfig

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.diffusers_cache(lambda: MagCacheConfig(calibrate=True, num_inference_steps=self.steps), noise, labels)
        line = [ln for ln in printed.getvalue().splitlines() if ln.strip().startswith("[")][-1]
        return ast.literal_eval(line.strip())

    def methods(self, profile, mag_ratios) -> list[Method]:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        n = self.steps
        m = [Method(f"full {n} steps", "reference", partial(self.plain, n))]
        for k in sorted({n // 2, n // 3, n // 4, n // 5}, reverse=True):
            m.append(Method(f"{k} steps", "fewer steps", partial(self.plain, k)))
        for every in (2, 3, 4, 5):
            pattern = "".join("F" if k % every == 0 or k == n - 1 else "." for k in range(n))
            m.append(Method(f"uniform reuse N={every}", "uniform", partial(self.xslim, XSlimConfig(pattern=pattern), None)))
        for speed in ("slow", "fast"):
            m.append(Method(f"X-Slim(S)-{speed}", "X-Slim", partial(self.xslim, preset_config(speed, levels={"step"}), profile)))
            m.append(Method(f"X-Slim(C2F)-{speed}", "X-Slim", partial(self.xslim, preset_config(speed), profile)))
            # the paper's plain reuse at skipped steps, for comparison with the presets' first-order forecast
            m.append(Method(f"X-Slim(C2F)-{speed} reuse", "X-Slim", partial(self.xslim, preset_config(speed, forecast=0), profile)))
        for warn, crit in ((0.3, 0.8), (0.6, 1.5)):
            cfg = XSlimConfig(mode="online", warn=warn, crit=crit)
            m.append(Method(f"X-Slim online {warn}/{crit}", "X-Slim", partial(self.xslim, cfg, profile)))
        for thr in (0.05, 0.1, 0.2):
            m.append(Method(f"diffusers FBC {thr}", "diffusers", partial(self.diffusers_cache, partial(FirstBlockCacheConfig, threshold=thr))))
        for interval in (3, 5):
            cfg = partial(TaylorSeerCacheConfig, cache_interval=interval, disable_cache_before_step=3, taylor_factors_dtype=torch.float32)
            m.append(Method(f"diffusers TaylorSeer N={interval}", "diffusers", partial(self.diffusers_cache, cfg)))
        for thr in (0.06, 0.12, 0.24):
            cfg = partial(MagCacheConfig, threshold=thr, num_inference_steps=n, mag_ratios=mag_ratios)
            m.append(Method(f"diffusers MagCache {thr}", "diffusers", partial(self.diffusers_cache, cfg)))
        return m

    def measure(self, method: Method, noise, labels) -> torch.Tensor:
        """Block evaluations per sample. Hooks on the blocks count executions over the whole batch; X-Slim may
        run rows (and token subsets) as separate sub-calls, so for it the engine's own row- and token-weighted
        count is used (the test suite checks it against the same hooks)."""
        self.last_stats = None
        with torch.inference_mode(), BlockExecutions(self.probes) as executed:
            latents = method.run(noise, labels)
        evals = float(executed.count) if self.last_stats is None else self.last_stats.effective_nfe * self.num_blocks
        method.results["block_evals"] = evals
        method.results["nfe"] = evals / self.num_blocks
        return latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images for the fidelity metrics (multiple of 10)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timing-images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--skip-compute-bound", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(args.out, exist_ok=True)

    bench = TeacherBench(args.steps)
    noise, labels = class_noise(args.images // 10, seed=1)
    with torch.inference_mode():
        prof_noise, prof_labels = class_noise(1, seed=99)  # profile: one uncached run, one image per class
        profile = record_profile(bench.model, partial(bench.plain, args.steps, prof_noise, prof_labels), bench.sigmas)
        mag_ratios = bench.calibrate_magcache(prof_noise, prof_labels)
    methods = bench.methods(profile, mag_ratios)
    classifier, reference = load_classifier()
    dist = DistributionMetrics(classifier, reference)

    images = {}
    for i, method in enumerate(methods):
        print(f"[{i + 1}/{len(methods)}] {method.name}", flush=True)
        images[method.name] = latent_to_image(bench.measure(method, noise, labels))
    full = images[methods[0].name]
    for method in methods:
        method.results.update(paired_fidelity(images[method.name], full))
        method.results.update(dist(images[method.name], labels))

    t_noise, t_labels = class_noise(max(1, args.timing_images // 10), seed=7)
    with torch.inference_mode():
        times = alternating_times({m.name: partial(m.run, t_noise, t_labels) for m in methods}, args.repeats)
    t_full = median(times[methods[0].name])
    for method in methods:
        method.results["speedup"] = t_full / median(times[method.name])

    table = format_table(methods, bench, args)
    print(table)
    with open(os.path.join(args.out, "teacher.md"), "w") as f:
        f.write(table)
    pareto_plot(methods, os.path.join(args.out, "pareto.png"))
    grid_picks = [m for m in methods if m.name in {methods[0].name, f"{args.steps // 5} steps", "uniform reuse N=5",
                  "X-Slim(C2F)-fast", "X-Slim(S)-fast", "diffusers FBC 0.2", "diffusers MagCache 0.24"}]
    side_by_side(grid_picks, images, labels, os.path.join(args.out, "grid.png"))
    if not args.skip_compute_bound:
        from .bench_compute import main as compute_bound

        compute_bound(["--repeats", str(args.repeats)])
    return 0


def format_table(methods: list[Method], bench: TeacherBench, args) -> str:
    full_evals = methods[0].results["block_evals"]
    lines = [
        f"Demo teacher (HunyuanVideo architecture, {bench.num_blocks} blocks), {args.steps}-step Euler, CFG {CFG}, "
        f"{args.images} images (fidelity) / {args.timing_images} images x {args.repeats} interleaved runs (speed), "
        f"{platform.machine()}, {torch.get_num_threads()} threads, fp32. PSNR/SSIM against full sampling; FD, "
        "accuracy, precision, recall and diversity in the shipped classifier's feature space.",
        "",
        "| method | group | block evals | eff. NFE | compute x | wall x | PSNR | PSNR p5 | SSIM | FD | acc | prec | rec | div |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        r = m.results
        lines.append(
            f"| {m.name} | {m.group} | {r['block_evals']:.0f} | {r['nfe']:.1f} | {full_evals / r['block_evals']:.2f} | "
            f"{r['speedup']:.2f} | {r['psnr']:.2f} | {r['psnr_p5']:.2f} | {r['ssim']:.3f} | {r['fd']:.2f} | "
            f"{r['accuracy']:.3f} | {r['precision']:.2f} | {r['recall']:.2f} | {r['diversity']:.3f} |"
        )
    lines += ["", "Compute-matched verdict (PSNR vs full; a method wins a budget when no baseline at equal or lower "
              "compute beats it):", ""]
    lines += verdicts(methods)
    return "\n".join(lines) + "\n"


def verdicts(methods: list[Method]) -> list[str]:
    out = []
    baselines = [m for m in methods if m.group in ("fewer steps", "uniform", "diffusers")]
    for m in (m for m in methods if m.group == "X-Slim"):
        cheaper = [b for b in baselines if b.results["block_evals"] <= m.results["block_evals"]]
        best = max(cheaper, key=lambda b: b.results["psnr"], default=None)
        if best is None:
            out.append(f"- {m.name}: no baseline at equal or lower compute ({m.results['nfe']:.1f} NFE).")
        elif m.results["psnr"] > best.results["psnr"]:
            out.append(f"- {m.name} ({m.results['nfe']:.1f} NFE): **beats** every baseline at <= its compute; best of those "
                       f"is {best.name} ({best.results['nfe']:.1f} NFE, {best.results['psnr']:.2f} dB vs {m.results['psnr']:.2f} dB).")
        else:
            out.append(f"- {m.name} ({m.results['nfe']:.1f} NFE): **loses** to {best.name} ({best.results['nfe']:.1f} NFE, "
                       f"{best.results['psnr']:.2f} dB vs {m.results['psnr']:.2f} dB).")
    return out


def pareto_plot(methods: list[Method], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_evals = methods[0].results["block_evals"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"reference": "*", "fewer steps": "s", "uniform": "v", "X-Slim": "o", "diffusers": "^"}
    for group, marker in markers.items():
        pts = [m for m in methods if m.group == group and m.group != "reference"]
        if not pts:
            continue
        xs = [full_evals / m.results["block_evals"] for m in pts]
        ys = [m.results["psnr"] for m in pts]
        ax.scatter(xs, ys, marker=marker, s=60, label=group)
        for m, x, y in zip(pts, xs, ys):
            ax.annotate(m.name.replace("diffusers ", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compute speedup (full block evaluations / method's)")
    ax.set_ylabel("PSNR vs full sampling (dB)")
    ax.set_title("Speed-fidelity on the demo teacher (higher and further right is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def side_by_side(methods: list[Method], images: dict, labels: torch.Tensor, path: str) -> None:
    """One row per method, the first image of every class in columns."""
    first = [int((labels == c).nonzero()[0]) for c in range(10)]
    tiles = torch.cat([images[m.name][first] for m in methods])
    names = [f"{m.name[:14]} {m.results['nfe']:.0f}" for m in methods]
    images_to_grid(tiles, len(methods), names).save(path)


if __name__ == "__main__":
    sys.exit(main())
