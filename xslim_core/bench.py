"""Speed benchmark on a compute-bound model: wall-clock speedup next to block-evaluation speedup.

    python -m xslim_core.bench [--layers 12 --width 512 --steps 28 --repeats 3]

Runs are interleaved (full, setting A, setting B, ... repeated) and the median is reported. The engine's
overhead is the cached time minus the ideal time of the same work: ideal = t_outside + (t_full - t_outside) x
(block evaluations / full block evaluations), where t_outside is a run of the same model with its block list
emptied (embeddings, final layer and sampler only, which X-Slim never skips).
"""

from __future__ import annotations

import argparse
import platform
import sys
from functools import partial

import torch

from . import XSlimConfig, preset_config, record_profile
from .demo import random_sd3
from .engine import run_cached
from .sampling import flow_sigmas, sample_euler
from .timing import alternating_times, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--side", type=int, default=32, help="latent side (tokens = (side/2)^2)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, velocity, shape = random_sd3(args.layers, args.width, args.side)
    sigmas = flow_sigmas(args.steps, shift=3.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sample = lambda: sample_euler(velocity, x, sigmas, cfg_scale=4.0)
    with torch.inference_mode():
        profile = record_profile(model, sample, sigmas)
        settings = {
            "step only (slow)": (preset_config("slow", levels={"step"}), profile),
            "X-Slim slow": (preset_config("slow"), profile),
            "X-Slim fast": (preset_config("fast"), profile),
            "online": (XSlimConfig(mode="online", warn=0.4, crit=1.0), None),
            "caching off (hooks only)": (XSlimConfig(mode="off"), None),
        }
        stats = {name: run_cached(model, *s, sigmas, sample)[1] for name, s in settings.items()}
        runs = {"full": sample, "no blocks": partial(without_blocks, model, sample)}
        runs.update({n: partial(run_cached, model, *s, sigmas, sample) for n, s in settings.items()})
        times = {name: median(t) for name, t in alternating_times(runs, args.repeats).items()}

    full_evals = args.steps * args.layers
    t_full, t_outside = times["full"], times["no blocks"]
    print(f"Compute-bound model: random SD3 MMDiT, {args.layers} blocks x width {args.width}, "
          f"{(args.side // 2) ** 2} image tokens, {args.steps} steps, CFG batch 2; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, fp32.")
    print(f"Full run: {t_full:.2f} s, of which outside the blocks {t_outside:.2f} s "
          f"(medians of {args.repeats}, interleaved).\n")
    print(f"{'setting':26} {'block evals':>11} {'blocks x':>8} {'wall x':>7} {'wall/blocks':>11} "
          f"{'overhead':>9} {'of saved':>8}")
    for name, st in stats.items():
        evals = st.block_evals / 2
        fraction = evals / full_evals
        t = times[name]
        overhead = t - (t_outside + (t_full - t_outside) * fraction)
        saved = t_full - t
        share = f"{100 * overhead / saved:7.1f}%" if saved > 0 else "     n/a"
        print(f"{name:26} {evals:11.1f} {1 / fraction:8.2f} {t_full / t:7.2f} {t_full / t * fraction:11.2f} "
              f"{overhead:8.3f}s {share}")
    return 0


def without_blocks(model, sample):
    """One run with the model's block list emptied: the cost of everything X-Slim never skips."""
    blocks = model.transformer_blocks
    model.transformer_blocks = torch.nn.ModuleList()
    try:
        return sample()
    finally:
        model.transformer_blocks = blocks


if __name__ == "__main__":
    sys.exit(main())
