"""X-Slim against what users would pick instead, on the shipped demo teacher, at the step counts people use.

    python -m xslim_lab.bench [--steps 20 28 50 --samplers euler ab2 --per-class 4 --out docs/bench] [--quick]

For every step count N and both samplers (Euler, and Adams-Bashforth-2 on the velocity: second order, one model
call per step, the family of ComfyUI's ``res_multistep``) the reference is full sampling with the same sampler
and N steps. Against it: X-Slim's presets (profiled and online), fewer steps with the same sampler, fewer steps
with AB2 (the best sampler here), uniform reuse every n-th step, diffusers' own caches (FirstBlockCache,
TaylorSeer-Lite, calibrated MagCache), and the published forecasting caches on the block stack (TaylorSeer orders
1 and 2, HiCache, FoCa: ``forecasters.py``) every 2nd to 6th step. Per method: block evaluations per image
(counted by hooks on the blocks, or by the engine for X-Slim, whose count the test suite checks against the same
hooks), median and 5th percentile PSNR over images, median SSIM, class accuracy, and (Euler) the wall-clock
speedup from interleaved runs on one thread. A verdict per X-Slim row against every baseline at equal or lower compute.

Image sets (disjoint in seeds and classes): the presets and the online lines were chosen on SELECTION; the
profile is one uncached Euler run at 50 steps on PROFILE_SET; the tables use HELD_OUT only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from xslim_core import XSlimConfig, online_preset_config, preset_config, record_profile
from xslim_core.engine import run_cached

from xslim_demo import latent_to_image, load_teacher
from xslim_demo.grid import class_noise, images_to_grid
from xslim_demo.teacher import CLASSES
from xslim_demo.sampling import SAMPLERS, flow_sigmas
from .forecasters import Forecaster, StackForecastHook, forecast_methods
from .timing import BlockExecutions, alternating_times, median

CFG = 2.0
FORECAST_INTERVALS = (2, 3, 4, 5, 6)  # forecasting caches: full every N-th step (about 2x to 6x compute)
PROFILE_STEPS = 50
TIE_DB = 0.25  # differences below this many dB count as ties


@dataclass(frozen=True)
class ImageSet:
    """Class-major noise from ``class_noise(per_class, seed)``, restricted to ``classes``."""

    name: str
    classes: tuple
    per_class: int
    seed: int

    def tensors(self, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        noise, labels = class_noise(per_class or self.per_class, seed=self.seed)
        keep = torch.isin(labels, torch.tensor(self.classes))
        return noise[keep], labels[keep]

    def describe(self, per_class: int | None = None) -> str:
        names = ", ".join(CLASSES[c] for c in self.classes)
        return f"seed {self.seed}, classes {list(self.classes)} ({names}), {per_class or self.per_class} per class"


SELECTION = ImageSet("selection", (0, 2, 4, 6, 8), 4, 7)  # presets and online lines were tuned here
PROFILE_SET = ImageSet("profile", (0, 2, 4, 6, 8), 1, 99)  # the one uncached run the profile comes from
HELD_OUT = ImageSet("held-out", (1, 3, 5, 7, 9), 4, 1)  # the tables


@dataclass
class Method:
    name: str
    group: str  # reference | steps | steps AB2 | uniform | diffusers | forecasting | X-Slim
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noise, labels) -> latents
    results: dict = field(default_factory=dict)


class TeacherBench:
    """One sampler at one step count on the demo teacher."""

    def __init__(self, teacher, sampler: str, steps: int):
        self.teacher, self.model = teacher, teacher.model
        self.sampler, self.steps = sampler, steps
        self.sigmas = flow_sigmas(steps)
        self.probes = [b.attn for b in list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)]
        self.num_blocks = len(self.probes)
        self.last_stats = None

    def plain(self, steps: int, noise, labels, sampler: str | None = None):
        return SAMPLERS[sampler or self.sampler](self.teacher.velocity_fn(labels), noise, flow_sigmas(steps), cfg_scale=CFG)

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
            return SAMPLERS[self.sampler](velocity, noise, self.sigmas, cfg_scale=CFG)
        finally:
            model.disable_cache()

    def forecasting(self, forecaster: Forecaster, interval: int, noise, labels):
        """A forecasting cache on the block stack (xslim_lab.forecasters), the same sampler and step count."""
        with StackForecastHook(self.model, forecaster, interval, self.steps):
            return self.plain(self.steps, noise, labels)

    def calibrate_magcache(self, noise, labels) -> list[float]:
        from diffusers import MagCacheConfig

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.diffusers_cache(lambda: MagCacheConfig(calibrate=True, num_inference_steps=self.steps), noise, labels)
        line = [ln for ln in printed.getvalue().splitlines() if ln.strip().startswith("[")][-1]
        return ast.literal_eval(line.strip())

    def xslim_methods(self, profile) -> list[Method]:
        out = []
        for speed in ("slow", "fast"):
            out.append(Method(f"X-Slim {speed}", "X-Slim", partial(self.xslim, preset_config(speed), profile)))
        for speed in ("slow", "fast"):
            out.append(Method(f"X-Slim online {speed}", "X-Slim", partial(self.xslim, online_preset_config(speed), None)))
        return out

    def baselines(self, step_counts: list[int], mag_ratios, diffusers_configs: str = "all",
                  forecast_intervals: tuple = FORECAST_INTERVALS) -> list[Method]:
        n = self.steps
        m = []
        for k in step_counts:
            m.append(Method(f"{k} steps", "steps", partial(self.plain, k)))
        if self.sampler != "ab2":
            for k in step_counts:
                m.append(Method(f"AB2 {k} steps", "steps AB2", partial(self.plain, k, sampler="ab2")))
        for every in (2, 3, 4, 5):
            pattern = "".join("F" if k % every == 0 or k == n - 1 else "." for k in range(n))
            m.append(Method(f"uniform reuse N={every}", "uniform", partial(self.xslim, XSlimConfig(pattern=pattern), None)))
        for f, every in forecast_methods(forecast_intervals):
            m.append(Method(f"{f.name} N={every}", "forecasting", partial(self.forecasting, f, every)))
        if diffusers_configs == "none":
            return m
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        few = diffusers_configs == "few"
        for thr in (0.2,) if few else (0.1, 0.2):
            m.append(Method(f"diffusers FBC {thr}", "diffusers", partial(self.diffusers_cache, partial(FirstBlockCacheConfig, threshold=thr))))
        for interval in (3,) if few else (3, 5):
            cfg = partial(TaylorSeerCacheConfig, cache_interval=interval, disable_cache_before_step=3,
                          taylor_factors_dtype=torch.float32, use_lite_mode=True)
            m.append(Method(f"diffusers TaylorSeer-Lite N={interval}", "diffusers", partial(self.diffusers_cache, cfg)))
        for thr in (0.24,) if few else (0.12, 0.24):
            cfg = partial(MagCacheConfig, threshold=thr, num_inference_steps=n, mag_ratios=mag_ratios)
            m.append(Method(f"diffusers MagCache {thr}", "diffusers", partial(self.diffusers_cache, cfg)))
        return m

    def measure(self, method: Method, noise, labels) -> torch.Tensor:
        """Block evaluations per image. Hooks on the blocks count executions over the whole batch; X-Slim may
        run rows (and token subsets) as separate sub-calls, so for it the engine's own row- and token-weighted
        count is used (the test suite checks it against the same hooks)."""
        self.last_stats = None
        with torch.inference_mode(), BlockExecutions(self.probes) as executed:
            latents = method.run(noise, labels)
        evals = float(executed.count) if self.last_stats is None else self.last_stats.effective_nfe * self.num_blocks
        method.results["block_evals"] = evals
        method.results["nfe"] = evals / self.num_blocks
        if self.last_stats is not None:
            method.results["pattern"] = self.last_stats.pattern()
        return latents


def per_image_fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Median and 5th percentile of per-image PSNR (dB, capped at 100 for identical images), median SSIM."""
    a, b = images.float().clamp(0, 1), reference.float().clamp(0, 1)
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=100.0)
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return {"psnr": psnr.median().item(), "psnr_p5": psnr.quantile(0.05).item(), "ssim": ssim.median().item(),
            "psnr_all": [round(v, 3) for v in psnr.tolist()]}


def matched_step_counts(steps: int, nfes: list[float]) -> list[int]:
    """Fewer-step baselines: the usual fractions of ``steps`` and, for each X-Slim row, the largest whole step
    count at or below its effective NFE (so every row has a step baseline at equal or lower compute)."""
    ks = {steps // 2, steps // 3, steps // 4, steps // 5} | {int(math.floor(v + 1e-9)) for v in nfes}
    return sorted((k for k in ks if 2 <= k < steps), reverse=True)


def run_step_count(teacher, steps: int, samplers: list[str], profile, noise, labels, classifier, args, log=print) -> dict:
    """All methods for every sampler at one step count; returns {sampler: [Method]} with results filled in."""
    prof_noise, prof_labels = PROFILE_SET.tensors()
    out = {}
    for sampler in samplers:
        bench = TeacherBench(teacher, sampler, steps)
        with torch.inference_mode():
            mag = bench.calibrate_magcache(prof_noise, prof_labels) if args.diffusers != "none" else None
        reference = Method(f"full {steps} steps", "reference", partial(bench.plain, steps))
        xs = bench.xslim_methods(profile)
        latents = {}
        for m in [reference] + xs:
            log(f"  {sampler} {steps}: {m.name}")
            latents[m.name] = bench.measure(m, noise, labels)
        ks = matched_step_counts(steps, [m.results["nfe"] for m in xs])
        rest = bench.baselines(ks, mag, args.diffusers, tuple(args.forecast_intervals))
        for m in rest:
            log(f"  {sampler} {steps}: {m.name}")
            latents[m.name] = bench.measure(m, noise, labels)
        methods = [reference] + xs + rest
        ref_images = latent_to_image(latents[reference.name])
        for m in methods:
            images = latent_to_image(latents[m.name])
            m.results.update(per_image_fidelity(images, ref_images))
            with torch.no_grad():
                m.results["accuracy"] = (classifier.logits(images).argmax(1) == labels).float().mean().item()
        m_full = reference.results["block_evals"]
        for m in methods:
            m.results["compute_x"] = m_full / max(m.results["block_evals"], 1e-9)
        out[sampler] = methods
        if sampler == samplers[0] and steps == max(args.steps):
            out["_grid"] = (methods, {k: latent_to_image(v) for k, v in latents.items()})
    return out


def time_methods(methods: list[Method], noise, labels, repeats: int) -> None:
    """Interleaved wall-clock on one thread: the reference, every X-Slim row and the baselines next to them."""
    picks = [m for m in methods if m.group in ("reference", "X-Slim", "steps") or m.name == "uniform reuse N=3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            picks[0].run(noise, labels)  # warm-up
            times = alternating_times({m.name: partial(m.run, noise, labels) for m in picks}, repeats)
    finally:
        torch.set_num_threads(threads)
    t_full = median(times[picks[0].name])
    for m in picks:
        m.results["wall_x"] = t_full / median(times[m.name])
        m.results["wall_over_blocks"] = m.results["wall_x"] / m.results["compute_x"]


def verdict(m: Method, baselines: list[Method]) -> tuple[str, Method | None]:
    """beats / ties / loses against the given baselines at equal or lower compute, on median and p5 PSNR.

    Against one baseline: it *beats* when neither figure is lower by more than TIE_DB and at least one is higher
    by more; it *loses* when neither is higher by more than TIE_DB and at least one is lower by more; anything
    else (all within TIE_DB, or one up and one down) is a *tie*. Against the group: loses if any baseline beats
    it, beats if it beats every one, else ties. Returns the deciding baseline (the one it loses or ties to, or
    the strongest it beats)."""
    cheaper = [b for b in baselines if b.results["block_evals"] <= m.results["block_evals"] + 1e-6]
    if not cheaper:
        return "no baseline at <= compute", None
    outcomes = []
    for b in cheaper:
        d = (m.results["psnr"] - b.results["psnr"], m.results["psnr_p5"] - b.results["psnr_p5"])
        up, down = any(x > TIE_DB for x in d), any(x < -TIE_DB for x in d)
        outcomes.append(("beats" if up and not down else "loses" if down and not up else "ties", b))
    strongest = lambda items: max(items, key=lambda ob: (ob[1].results["psnr"], ob[1].results["psnr_p5"]))[1]  # noqa: E731
    for word in ("loses", "ties"):
        hits = [ob for ob in outcomes if ob[0] == word]
        if hits:
            return word, strongest(hits)
    return "beats", strongest(outcomes)


VERDICT_GROUPS = (("steps", "fewer steps, same sampler"), ("steps AB2", "fewer steps, AB2"), ("uniform", "uniform reuse"),
                  ("diffusers", "diffusers caches"), ("forecasting", "forecasting caches"))


def verdict_lines(methods: list[Method], sampler: str) -> list[str]:
    lines = []
    for m in (m for m in methods if m.group == "X-Slim"):
        parts = []
        for group, label in VERDICT_GROUPS:
            base = [b for b in methods if b.group == group]
            if not base:
                continue
            word, b = verdict(m, base)
            if b is None:
                parts.append(f"{label}: {word}")
            else:
                parts.append(f"{label}: **{word}** ({b.name}: {b.results['nfe']:.1f} NFE, {b.results['psnr']:.2f} / {b.results['psnr_p5']:.2f} dB)")
        everything = [b for b in methods if b.group not in ("reference", "X-Slim")]
        word, _ = verdict(m, everything)
        lines.append(f"- **{m.name}** ({m.results['nfe']:.1f} NFE, {m.results['compute_x']:.2f}x, {m.results['psnr']:.2f} / "
                     f"{m.results['psnr_p5']:.2f} dB): overall **{word}**; " + "; ".join(parts) + ".")
    return lines


def format_tables(all_results: dict, args, machine: str) -> str:
    lines = [
        "# X-Slim on the demo teacher: the benchmark users would run",
        "",
        f"`python -m xslim_lab.bench {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"Demo teacher (HunyuanVideo architecture, 12 blocks), CFG {CFG}, fp32, {machine}. "
        f"Held-out images: {HELD_OUT.describe(args.per_class)} ({len(HELD_OUT.classes) * args.per_class} images). "
        f"Presets and online lines were tuned on {SELECTION.describe()} (disjoint seeds and classes); the profile is "
        f"one uncached Euler run at {PROFILE_STEPS} steps on {PROFILE_SET.describe()}, used at every step count and "
        "for both samplers. Reference: full sampling with the same sampler and step count. PSNR: median / 5th "
        "percentile over images; SSIM: median. Block evaluations per image (12 per full step). Wall x: interleaved "
        f"runs on one thread ({args.timing_images} images x {args.repeats} rounds, Euler); wall/blocks = wall x / compute x. "
        f"A verdict compares median and 5th-percentile PSNR with every baseline at equal or lower compute "
        f"(differences under {TIE_DB} dB tie). How the presets were chosen, which targets are met and why: "
        "[findings.md](findings.md); the plot: [pareto.png](pareto.png).",
        "",
    ]
    for steps in args.steps:
        for sampler in args.samplers:
            methods = all_results[steps][sampler]
            lines += [f"## {steps} steps, {'Euler' if sampler == 'euler' else 'AB2'}", "",
                      "| method | group | block evals | eff. NFE | compute x | wall x | wall/blocks | PSNR median | PSNR p5 | SSIM | acc |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for m in methods:
                r = m.results
                wall = f"{r['wall_x']:.2f}" if "wall_x" in r else "-"
                wob = f"{r['wall_over_blocks']:.2f}" if "wall_over_blocks" in r and m.group != "reference" else "-"
                name = f"**{m.name}**" if m.group == "X-Slim" else m.name
                lines.append(f"| {name} | {m.group} | {r['block_evals']:.0f} | {r['nfe']:.1f} | {r['compute_x']:.2f} | {wall} | "
                             f"{wob} | {r['psnr']:.2f} | {r['psnr_p5']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.2f} |")
            lines += ["", "Verdicts (median / p5 PSNR of the deciding baseline in brackets):", ""]
            lines += verdict_lines(methods, sampler)
            lines.append("")
    return "\n".join(lines) + "\n"


def pareto_plot(all_results: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(args.samplers), len(args.steps)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    style = {"steps": ("s", "tab:gray"), "steps AB2": ("D", "tab:olive"), "uniform": ("v", "tab:brown"),
             "diffusers": ("^", "tab:purple"), "forecasting": ("P", "tab:green"), "X-Slim": ("o", "tab:red")}
    for i, sampler in enumerate(args.samplers):
        for j, steps in enumerate(args.steps):
            ax = axes[i][j]
            methods = all_results[steps][sampler]
            for group, (marker, color) in style.items():
                # a cache that saved nothing (compute x 1, PSNR 100) would only stretch the axis
                pts = sorted((m for m in methods if m.group == group and m.results["compute_x"] > 1.01),
                             key=lambda m: m.results["compute_x"])
                if not pts:
                    continue
                xs = [m.results["compute_x"] for m in pts]
                ax.scatter(xs, [m.results["psnr"] for m in pts], marker=marker, color=color, s=36, label=group)
                ax.scatter(xs, [m.results["psnr_p5"] for m in pts], marker=marker, facecolors="none", edgecolors=color, s=20)
                if group.startswith("steps"):
                    ax.plot(xs, [m.results["psnr"] for m in pts], color=color, lw=0.8)
                if group == "X-Slim":
                    for m in pts:
                        ax.annotate(m.name.replace("X-Slim ", ""), (m.results["compute_x"], m.results["psnr"]), fontsize=7,
                                    xytext=(3, 3), textcoords="offset points")
            ax.set_title(f"{steps} steps, {'Euler' if sampler == 'euler' else 'AB2'} (reference: same)", fontsize=9)
            ax.set_xlabel("compute speedup (block evaluations)", fontsize=8)
            ax.set_ylabel("PSNR dB (filled: median, hollow: p5)", fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def side_by_side(methods: list[Method], images: dict, labels: torch.Tensor, path: str) -> None:
    """One row per method, the first image of every held-out class in columns."""
    first = [int((labels == c).nonzero()[0]) for c in sorted(set(labels.tolist()))]
    tiles = torch.cat([images[m.name][first] for m in methods])
    names = [f"{m.name[:14]} {m.results['nfe']:.0f}" for m in methods]
    images_to_grid(tiles, len(methods), names).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 28, 50])
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=["euler", "ab2"])
    parser.add_argument("--per-class", type=int, default=HELD_OUT.per_class, help="held-out images per class (5 classes)")
    parser.add_argument("--timing-images", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--diffusers", choices=["all", "few", "none"], default="all", help="which diffusers caches to run")
    parser.add_argument("--forecast-intervals", type=int, nargs="*", default=list(FORECAST_INTERVALS),
                        help="forecasting caches (TaylorSeer, HiCache, FoCa): full every N-th step; none: leave them out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the fidelity runs (timing uses 1; more threads crawl on a busy machine)")
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--quick", action="store_true", help="10 steps, one image per class, one timing round (tests)")
    parser.add_argument("--skip-compute-bound", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.steps, args.per_class, args.repeats, args.timing_images, args.diffusers = [10], 1, 1, 2, "few"
        args.forecast_intervals = [3]
        args.skip_compute_bound = True
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    os.makedirs(args.out, exist_ok=True)

    teacher = load_teacher()
    from xslim_demo.classifier import load_classifier

    classifier, _ = load_classifier()
    noise, labels = HELD_OUT.tensors(args.per_class)
    prof_noise, prof_labels = PROFILE_SET.tensors()
    with torch.inference_mode():
        profile_bench = TeacherBench(teacher, "euler", PROFILE_STEPS)
        profile = record_profile(teacher.model, partial(profile_bench.plain, PROFILE_STEPS, prof_noise, prof_labels),
                                 profile_bench.sigmas)
    all_results, grid = {}, None
    for steps in args.steps:
        print(f"[{steps} steps]", flush=True)
        res = run_step_count(teacher, steps, args.samplers, profile, noise, labels, classifier, args,
                             log=lambda s: print(s, flush=True))
        grid = res.pop("_grid", grid)
        t_noise, t_labels = noise[: args.timing_images], labels[: args.timing_images]
        time_methods(res[args.samplers[0]], t_noise, t_labels, args.repeats)
        all_results[steps] = res

    machine = f"{platform.machine()} CPU, {args.threads} torch threads for fidelity, 1 for timing"
    text = format_tables(all_results, args, machine)
    print(text)
    with open(os.path.join(args.out, "teacher.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({str(s): {sm: [{"name": m.name, "group": m.group, **m.results} for m in ms] for sm, ms in r.items()}
                   for s, r in all_results.items()}, f, indent=1)
    pareto_plot(all_results, args, os.path.join(args.out, "pareto.png"))
    if grid is not None:
        methods, images = grid
        wanted = ["reference", "X-Slim"]
        picks = [m for m in methods if m.group in wanted]
        fast = next(m for m in methods if m.name == "X-Slim fast")
        k = int(math.floor(fast.results["nfe"] + 1e-9))
        picks += [m for m in methods if m.name in (f"{k} steps", f"AB2 {k} steps", "uniform reuse N=5", "diffusers FBC 0.2",
                                                   "diffusers MagCache 0.24")]
        side_by_side(picks, images, labels, os.path.join(args.out, "grid.png"))
    if not args.skip_compute_bound:
        from .bench_compute import main as compute_bound

        compute_bound(["--repeats", str(args.repeats)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
