"""Speed on a compute-bound model: wall-clock speedup next to block-evaluation speedup.

    python -m xslim_lab.bench_compute [--layers 12 --width 512 --steps 28 --repeats 3]

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

from xslim_core import XSlimConfig, adapter_for, online_preset_config, preset_config, record_profile
from .random_models import random_flux, random_sd3
from xslim_core.engine import run_cached
from xslim_demo.sampling import flow_sigmas, sample_euler
from .timing import alternating_times, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--side", type=int, default=32, help="latent side (tokens = (side/2)^2)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["sd3", "flux"], default="sd3",
                        help="sd3: random SD3 MMDiT (--layers/--width/--side), CFG batch 2; flux: random FLUX.1-dev "
                        "architecture (19+38 blocks, width 3072, --side 128 = 1024x1024), guidance-distilled batch 1")
    parser.add_argument("--flux-heads", type=int, default=24, help="flux: heads of 128 channels (24 = FLUX.1-dev)")
    parser.add_argument("--flux-double", type=int, default=19)
    parser.add_argument("--flux-single", type=int, default=38)
    parser.add_argument("--flux-text", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: a shared machine's other work disturbs it least)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, torch.get_num_threads())))
    dtype = getattr(torch, args.dtype)

    if args.model == "sd3":
        model, velocity, shape = random_sd3(args.layers, args.width, args.side)
        model.to(args.device, dtype)
        cfg, rows = 4.0, 2
    else:
        model, velocity, shape = random_flux(args.flux_heads, args.flux_double, args.flux_single, args.side,
                                             args.flux_text, args.device, dtype)
        cfg, rows = None, 1
    sigmas = flow_sigmas(args.steps, shift=3.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def sample():
        out = sample_euler(velocity, x, sigmas, cfg_scale=cfg)
        sync()
        return out

    with torch.inference_mode():
        profile = record_profile(model, sample, sigmas)
        settings = {
            "three levels (slow)": (preset_config("slow", levels={"step", "block", "token"}), profile),
            "X-Slim slow": (preset_config("slow"), profile),
            "X-Slim fast": (preset_config("fast"), profile),
            "X-Slim online slow": (online_preset_config("slow"), None),
            "X-Slim online fast": (online_preset_config("fast"), None),
            "caching off (hooks only)": (XSlimConfig(mode="off"), None),
        }
        stats = {name: run_cached(model, *s, sigmas, sample)[1] for name, s in settings.items()}
        sample()  # warm-up
        runs = {"full": sample, "no blocks": partial(without_blocks, model, sample)}
        runs.update({n: partial(run_cached, model, *s, sigmas, sample) for n, s in settings.items()})
        times = {name: median(t) for name, t in alternating_times(runs, args.repeats).items()}

    num_blocks = len(model_blocks(model))
    full_evals = args.steps * num_blocks
    t_full, t_outside = times["full"], times["no blocks"]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"Compute-bound model: random {args.model.upper()}, {num_blocks} blocks, {shape[1] if args.model == 'flux' else (args.side // 2) ** 2} "
          f"image tokens, {args.steps} steps, batch {rows}; {where}, {args.dtype}.")
    print(f"Full run: {t_full:.2f} s, of which outside the blocks {t_outside:.2f} s "
          f"(medians of {args.repeats}, interleaved).\n")
    print(f"{'setting':26} {'block evals':>11} {'blocks x':>8} {'wall x':>7} {'wall/blocks':>11} "
          f"{'overhead':>9} {'of saved':>8}")
    for name, st in stats.items():
        evals = st.block_evals / rows
        fraction = evals / full_evals
        t = times[name]
        overhead = t - (t_outside + (t_full - t_outside) * fraction)
        saved = t_full - t
        share = f"{100 * overhead / saved:7.1f}%" if saved > 0 else "     n/a"
        print(f"{name:26} {evals:11.1f} {1 / fraction:8.2f} {t_full / t:7.2f} {t_full / t * fraction:11.2f} "
              f"{overhead:8.3f}s {share}")
    return 0


def model_blocks(model) -> list:
    """The model's blocks as the engine sees them (its adapter: the one list of block stacks)."""
    return [spec.module for spec in adapter_for(model).blocks(model)]


def without_blocks(model, sample):
    """One run with the model's block lists emptied: the cost of everything X-Slim never skips."""
    names = [attr for _, attr in adapter_for(model).stacks]
    saved = {n: getattr(model, n) for n in names}
    for n in names:
        setattr(model, n, torch.nn.ModuleList())
    try:
        return sample()
    finally:
        for n, blocks in saved.items():
            setattr(model, n, blocks)


if __name__ == "__main__":
    sys.exit(main())
