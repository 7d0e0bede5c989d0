"""The real 1.x-Distill trainer (``distill_core.runtime.run_training``: Stage I with cache co-training) on a
random-weight SD3.5-Medium-shaped transformer: LoRA student and fake score on one shared bf16 base, bf16
autocast, optional gradient checkpointing. Prints iterations/s, peak GPU memory and the memory planner's
prediction for the same setup. Random weights: the numbers are about speed and memory, not quality.

    python scripts/gpu_trainer_bench.py                        # CUDA: SD3.5-M shape, 1024^2, LoRA r64, 200 it.
    python scripts/gpu_trainer_bench.py --checkpointing --iterations 100
    python scripts/gpu_trainer_bench.py --tiny                 # CPU smoke run: a tiny SD3 model, fp32, 3 it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from distill_core import memory as M
from distill_core.conditioning import Conditioning, PromptSet
from distill_core.config import RunConfig
from distill_core.models import FlowModel, Teacher
from distill_core.runtime import run_training

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
            caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)


def random_prompts(n: int, tokens: int, width: int, pooled: int, seed: int = 0) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(n, tokens, width, generator=g), torch.randn(n, pooled, generator=g))
    uncond = Conditioning(torch.randn(1, tokens, width, generator=g), torch.randn(1, pooled, generator=g))
    return PromptSet([f"random prompt {i}" for i in range(n)], cond, uncond, kind="random")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny SD3 model on the CPU (a smoke run of this script)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    from diffusers import SD3Transformer2DModel

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    config = TINY if args.tiny else SD35_MEDIUM
    with torch.device(device):
        module = SD3Transformer2DModel(**config).to(torch.bfloat16 if cuda else torch.float32)
    params = sum(t.numel() for t in module.parameters())  # before the LoRA adapters join the module
    side = 8 if args.tiny else args.resolution // 8
    latent = (config["in_channels"], side, side)
    prompts = random_prompts(16, 6 if args.tiny else 77 + 256, config["joint_attention_dim"], config["pooled_projection_dim"])
    teacher = Teacher(FlowModel(module, latent), prompts, {"hash": "random-sd35-medium", "name": "random SD3.5-M"})
    iterations = args.iterations or (3 if args.tiny else 200)
    blocks = config["num_layers"]
    run_dir = tempfile.mkdtemp(prefix="xslim-gpu-trainer-")
    cfg = RunConfig(run_dir=run_dir, iterations=iterations, batch_size=args.batch, checkpoint_every=10**6, preview_every=0,
                    threads=2, device=device, precision="bf16" if cuda else "fp32", lora_rank=args.rank,
                    gradient_checkpointing=args.checkpointing,
                    stage1={"cache_first": max(0, blocks // 2 - 2), "cache_last": blocks // 2 + 1})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = run_training(cfg, teacher=teacher)
    wall = time.time() - started
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    shutil.rmtree(run_dir, ignore_errors=True)  # the figures are all it keeps (a run folder per call filled /tmp)
    steady = metrics[len(metrics) // 4 :] or metrics  # leave the warm-up out of the speed
    span = steady[-1]["elapsed_s"] - (steady[0]["elapsed_s"] if len(steady) > 1 else 0.0)
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu", "status": result["status"], "iterations": iterations,
               "it_per_s": (len(steady) - 1) / span if len(steady) > 1 and span > 0 else metrics[-1]["it_per_s"],
               "wall_s": round(wall, 1), "batch": args.batch, "lora_rank": args.rank, "checkpointing": args.checkpointing,
               "resolution": args.resolution if not args.tiny else None,
               "params": params}
    if cuda:
        figures["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / M.GIB, 2)
        figures["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / M.GIB, 2)
        setup = M.model_setup("sd3.5-medium", resolution=(args.resolution, args.resolution), batch=args.batch, mode="lora",
                              lora_rank=args.rank, checkpointing=args.checkpointing, dtype="bf16")
        prediction = M.predict(setup)
        figures["planner_peak_gib"] = round(prediction.peak / M.GIB, 2)
        figures["planner_vs_measured"] = round(prediction.peak / torch.cuda.max_memory_allocated() - 1, 3)
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if result["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
