"""`make demo`: sample with and without X-Slim on the embedded default model and print what it saved.

The default model is a small random-weight SD3-architecture DiT (diffusers' SD3Transformer2DModel), built
here because no pretrained weights can be downloaded. Random weights show the mechanics and the speed;
fidelity figures on them say little (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from . import XSlimConfig, preset_config, record_profile
from .engine import run_cached
from .sampling import flow_sigmas, sample_euler
from .timing import alternating_times, median, psnr


def random_sd3(layers: int = 12, width: int = 256, side: int = 32, seed: int = 0):
    """A random-weight SD3 MMDiT and a velocity function (CFG rows: [uncond; cond])."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    heads = width // 64
    model = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=heads, caption_projection_dim=width, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=side,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    context, pooled = torch.randn(2, 16, 64, generator=g), torch.randn(2, 64, generator=g)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        b = x.shape[0]
        rows = torch.arange(b) % 2 if b == 2 else torch.ones(b, dtype=torch.long)
        return model(hidden_states=x, encoder_hidden_states=context[rows], pooled_projections=pooled[rows],
                     timestep=torch.full((b,), sigma * 1000.0), return_dict=False)[0]

    return model, velocity, (1, 16, side, side)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=1, help="alternating timing rounds")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    model, velocity, shape = random_sd3(args.layers, args.width)
    sigmas = flow_sigmas(args.steps, shift=3.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(42))
    sample = lambda: sample_euler(velocity, x, sigmas, cfg_scale=args.cfg)
    print(f"Model: random-weight SD3 MMDiT, {args.layers} blocks, width {args.width}, "
          f"{(shape[2] // 2) ** 2} image tokens; {args.steps} Euler steps, CFG {args.cfg} (batch 2).")

    with torch.inference_mode():
        reference = sample()
        profile = record_profile(model, sample, sigmas)
        settings = {
            "X-Slim slow (schedule)": (preset_config("slow"), profile),
            "X-Slim fast (schedule)": (preset_config("fast"), profile),
            "X-Slim online": (XSlimConfig(mode="online", warn=0.4, crit=1.0), None),
        }

        results = {name: run_cached(model, *s, sigmas, sample) for name, s in settings.items()}
        runs = {"full": sample, **{name: partial(run_cached, model, *s, sigmas, sample) for name, s in settings.items()}}
        times = {name: median(t) for name, t in alternating_times(runs, args.repeats).items()}

    full_evals = args.steps * args.layers
    print(f"\n{'setting':26} {'eff. NFE':>8} {'block evals':>11} {'blocks x':>8} {'wall x':>7} "
          f"{'PSNR dB':>8} {'max |diff|':>10}  decisions")
    print(f"{'full (no cache)':26} {args.steps:8.1f} {full_evals:11d} {1.0:8.2f} {1.0:7.2f} {'inf':>8} {0.0:10.4f}")
    for name, (out, stats) in results.items():
        evals = stats.block_evals / 2  # per sample (the CFG batch has two rows)
        print(f"{name:26} {stats.effective_nfe:8.1f} {evals:11.1f} {full_evals / evals:8.2f} "
              f"{times['full'] / times[name]:7.2f} {psnr(out, reference):8.2f} {(out - reference).abs().max().item():10.4f}"
              f"  {stats.pattern()}")
    print(f"\nWall-clock: median of {args.repeats} alternating runs, full run {times['full']:.2f} s, "
          f"{torch.get_num_threads()} threads. Decisions: F full, B block refresh, T token refresh, . skipped.")
    print(results["X-Slim slow (schedule)"][1].summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
