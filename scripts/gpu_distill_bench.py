"""DMD-like training speed and peak memory of a random-weight SD3.5-Medium-shaped transformer with two LoRA
adapters on one shared bf16 base, next to the memory planner's prediction.

    python scripts/gpu_distill_bench.py                       # CUDA: SD3.5-M shape, 1024^2, LoRA r64, 300 it.
    python scripts/gpu_distill_bench.py --checkpointing --batch 2
    python scripts/gpu_distill_bench.py --tiny                # CPU smoke run: tiny SD3.5 model, fp32, 10 it.

Each iteration has Stage I's shape: backward simulation (student, no grad), fake-score update (adapter "fake",
MSE to the student's sample, AdamW), student update (adapter "student" + a compensation MLP, graph alive while
the teacher = the base with adapters disabled runs CFG and the fake score its no-grad forward, pseudo-Huber DMD
loss, AdamW). Random weights: the numbers are about speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import torch

from distill_core import memory as M
from xslim_lab.memory_bench import LORA_TARGETS, Comp, dmd_step, tiny

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TEXT_TOKENS = 77 + 256  # CLIP-L/G + T5 (the SD3 pipeline's default max_sequence_length)


def build(args, device):
    if args.tiny:
        h = tiny("sd3.5")
        return h.model, h.latent, h.velocity, h.arch, h.resolution, h.text_tokens
    from diffusers import SD3Transformer2DModel

    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16 on the device: no fp32 copy
    with torch.device(device):
        model = SD3Transformer2DModel(**SD35_MEDIUM)
    torch.set_default_dtype(torch.float32)
    g = torch.Generator(device).manual_seed(0)
    ctx = torch.randn(4, TEXT_TOKENS, 4096, device=device, generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(4, 2048, device=device, generator=g, dtype=torch.bfloat16)

    def velocity(m, x, s, rows):
        return m(hidden_states=x, encoder_hidden_states=ctx[rows], pooled_projections=pooled[rows],
                 timestep=torch.full((x.shape[0],), s * 1000.0, device=x.device), return_dict=False)[0]

    arch = M.MODELS["sd3.5-medium"]
    lat = args.resolution // 8
    return model, (16, lat, lat), velocity, arch, (args.resolution, args.resolution), TEXT_TOKENS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random SD3.5 model on CPU (fp32): a smoke run")
    ap.add_argument("--iters", type=int, default=None, help="measured iterations (default 300, tiny 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if args.rank <= 0:
        ap.error("--rank must be positive")
    iters = args.iters or (10 if args.tiny else 300)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        ap.error("no CUDA device: use --tiny for the CPU smoke run")
    cuda = device == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    from peft import LoraConfig

    model, latent, velocity, arch, resolution, text_tokens = build(args, device)
    model.requires_grad_(False)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    for name in ("student", "fake"):
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"), adapter_name=name)
    params = {a: [p for n, p in model.named_parameters() if f".{a}." in n] for a in ("student", "fake")}
    for ps in params.values():
        for p in ps:
            p.data = p.data.float()  # fp32 adapters (master weights) on the bf16 base, as the planner assumes
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    width = arch.width
    comp = Comp(width).to(device)
    model.norm_out.register_forward_pre_hook(lambda m, a: ((comp(a[0]),) + tuple(a[1:])) if state["comp"] else None)
    state = {"comp": False}
    opt = {"student": torch.optim.AdamW(params["student"] + list(comp.parameters()), lr=1e-5, betas=(0.0, 0.999)),
           "fake": torch.optim.AdamW(params["fake"], lr=8e-5, betas=(0.0, 0.999))}

    def run(role, x, s, rows):
        if role == "teacher":
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(role)
            for ps in params.values():  # set_adapter freezes the inactive adapter; both must stay trainable
                for p in ps:
                    p.requires_grad_(True)
        state["comp"] = role == "student" and torch.is_grad_enabled()
        with amp:
            return velocity(model, x, s, rows).float()

    g = torch.Generator(device).manual_seed(0)

    def step():
        rows = torch.randint(1, 4, (args.batch,), device=device, generator=g)
        noise = torch.randn(args.batch, *latent, device=device, generator=g)
        s = float(torch.rand((), generator=g, device=device)) * 0.9 + 0.05
        return dmd_step(run, params, opt, noise, rows, s, cfg=True)

    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    setup = M.Setup(arch=replace(arch, params=base_params), resolution=resolution, batch=args.batch,
                    dtype="bf16" if cuda else "fp32", mode="lora", lora_rank=args.rank,
                    checkpointing=args.checkpointing, text_tokens=text_tokens, compensation_streams=1,
                    device=device)
    pred = M.predict(setup)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; base {base_params / 1e6:.1f} M params; "
          f"LoRA r{args.rank}: {sum(p.numel() for p in params['student']) / 1e6:.2f} M per adapter; "
          f"{setup.tokens()[0]} image + {text_tokens} text tokens; batch {args.batch}; "
          f"checkpointing {'on' if args.checkpointing else 'off'}")
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(iters):
        loss = step()
        if (i + 1) % max(1, iters // 5) == 0:
            print(f"  it {i + 1}/{iters} loss {loss:.4f}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"iterations/s: {iters / dt:.3f} ({dt / iters * 1000:.1f} ms per iteration, {iters} iterations)")
    print(f"planner: tensors {pred.peak / M.GIB:.2f} GiB, with CUDA margin {pred.reserved / M.GIB:.2f} GiB "
          f"(peak in {pred.phase})")
    if cuda:
        alloc, res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        print(f"measured: max_memory_allocated {alloc / M.GIB:.2f} GiB (planner {pred.peak / alloc - 1:+.1%}), "
              f"max_memory_reserved {res / M.GIB:.2f} GiB")
    else:
        from xslim_lab.memory_bench import measure  # same iteration shape, measured with the profiler

        r = measure(tiny("sd3.5"), "lora", args.checkpointing, batch=args.batch, rank=args.rank)
        print(f"measured (CPU, profiler, memory_bench's iteration): {r['measured'] / 2**20:.2f} MiB, "
              f"planner {r['predicted'] / 2**20:.2f} MiB ({r['error']:+.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
