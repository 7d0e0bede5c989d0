"""Predicted vs measured peak memory of one emulated DMD iteration on tiny models (CPU), and the planner's
choices for the published models.

    python -m xslim_lab.memory_bench            # table of predicted vs measured, then the big-model plans
    python -m xslim_lab.memory_bench --quick    # the four configurations the tests use

The iteration is emulated here rather than taken from distill_core's trainers (which are being refactored) but
has their memory shape: backward simulation without grad, fake-score update (forward + backward + AdamW),
student update whose graph stays alive while the teacher runs its CFG forward (cond + uncond rows) and the
fake score its no-grad forward, then backward + AdamW; a compensation MLP trained with the student.

Measurement: torch.profiler's memory events report every CPU allocation and free (pointer-exact, no
allocator rounding); the peak is the running sum's maximum on top of the tensors alive before (weights,
adapters, AdamW states, conditioning). The second iteration is measured so AdamW's states already exist.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from distill_core import memory as M
from xslim_core.families import DIFFUSERS_LORA_TARGETS as LORA_TARGETS  # the trainer's own pattern


@dataclass
class Harness:
    name: str
    model: nn.Module
    arch: M.Architecture
    latent: tuple  # without batch
    resolution: tuple  # pixels, so that the planner derives the same token count
    text_tokens: int
    velocity: callable  # (model, x, sigma, rows) -> v; row 0 = unconditional prompt
    extra: list  # tensors alive for the whole run (conditioning), counted in the baseline


def _cond(seed, n, tokens, dim, pooled):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, tokens, dim, generator=g), torch.randn(4, pooled, generator=g)


def tiny(name: str) -> Harness:
    """Tiny random-weight diffusers models (the configurations of tests/families.py)."""
    torch.manual_seed(0)
    if name in ("sd3", "sd3.5"):
        from diffusers import SD3Transformer2DModel

        dual = name == "sd3.5"
        m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=8, attention_head_dim=8,
                                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32,
                                  dual_attention_layers=tuple(range(8)) if dual else (),
                                  qk_norm="rms_norm" if dual else None)
        ctx, pooled = _cond(1, 4, 7, 32, 16)

        def v(m, x, s, rows):
            return m(hidden_states=x, encoder_hidden_states=ctx[rows], pooled_projections=pooled[rows],
                     timestep=torch.full((x.shape[0],), s * 1000.0), return_dict=False)[0]

        arch = M.Architecture(name, 32, 4, 8, dual_attention_blocks=8 if dual else 0)
        # SD3 latents are /8 of the image, patch 2: a 16x16 latent is a 128x128 image
        return Harness(name, m, arch, (4, 16, 16), (128, 128), 7, v, [ctx, pooled])
    if name == "flux":
        from diffusers import FluxTransformer2DModel

        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        ctx, pooled = _cond(2, 4, 6, 32, 32)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        img_ids, txt_ids = ids.reshape(-1, 3), torch.zeros(6, 3)

        def v(m, x, s, rows):
            return m(hidden_states=x, encoder_hidden_states=ctx[rows], pooled_projections=pooled[rows],
                     timestep=torch.full((x.shape[0],), float(s)), img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]

        arch = M.Architecture("flux", 32, 2, 2, 6)
        return Harness(name, m, arch, (64, 16), (128, 128), 6, v, [ctx, pooled, img_ids, txt_ids])
    if name in ("hunyuan_video", "demo"):
        from diffusers import HunyuanVideoTransformer3DModel

        if name == "demo":
            from xslim_demo.teacher import load_teacher, velocity

            t = load_teacher()
            t.conditioner.requires_grad_(False)

            def v(m, x, s, rows):
                return velocity(m, t.conditioner, x, s, torch.where(rows == 0, t.conditioner.null_class, rows))

            arch = M.MODELS["demo"]
            # 8x8 latents at patch 1; the family's /4 downscale makes that 32x32 "pixels"
            return Harness(name, t.model, arch, (16, 1, 8, 8), (32, 32), 4, v, list(t.conditioner.parameters()))
        m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=2, num_single_layers=6, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
        ctx, pooled = _cond(3, 4, 5, 16, 8)
        mask = torch.ones(4, 5)
        mask[0, 3:] = 0

        def v(m, x, s, rows):
            b = x.shape[0]
            return m(hidden_states=x, timestep=torch.full((b,), s * 1000.0), encoder_hidden_states=ctx[rows],
                     encoder_attention_mask=mask[rows], pooled_projections=pooled[rows],
                     guidance=torch.full((b,), 3500.0), return_dict=False)[0]

        arch = M.Architecture("hunyuan_video", 20, 2, 2, 6)
        # patch 1 on an 8x8 latent: the planner's patch-2 family sees 16x16 latent = 128 px
        return Harness(name, m, arch, (4, 1, 8, 8), (128, 128), 5, v, [ctx, pooled, mask])
    raise ValueError(f"unknown tiny model {name!r}")


class Comp(nn.Module):
    """DeltaMLP-shaped compensation module applied to the image stream before the final norm."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.net(x)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(h: Harness, mode: str, checkpointing: bool, batch: int = 2, rank: int = 4, cfg: bool = True) -> dict:
    """Peak live tensor bytes of the second emulated iteration, and the planner's prediction for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and the CPU is shared
    try:
        return _measure(h, mode, checkpointing, batch, rank, cfg)
    finally:
        torch.set_num_threads(threads)


def dmd_step(run, params: dict, opt: dict, noise: torch.Tensor, rows: torch.Tensor, s: float, cfg: bool) -> float:
    """One emulated 1.x-Distill iteration, with the memory shape of the real one: the student's own 1-step
    sample (no grad), a fake-score update on it at noise level ``s``, then the student update whose DMD target
    needs the teacher (with CFG: cond and uncond rows) and the fake score. ``run(role, x, sigma, rows)`` is the
    velocity of "student", "fake" or "teacher". Returns the student loss."""
    with torch.no_grad():  # backward simulation: the student's own 1-step sample
        x0 = noise - run("student", noise, 1.0, rows)
    xs = (1 - s) * x0 + s * torch.randn_like(x0)
    loss = (run("fake", xs, s, rows) - (xs - x0) / s).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params["fake"], 1.0)
    opt["fake"].step()
    opt["fake"].zero_grad(set_to_none=True)
    x_hat = noise - run("student", noise, 1.0, rows)  # student update: graph alive through the scores
    xs = (1 - s) * x_hat.detach() + s * torch.randn_like(x0)
    with torch.no_grad():
        if cfg:
            vu, vc = run("teacher", torch.cat([xs, xs]), s, torch.cat([torch.zeros_like(rows), rows])).chunk(2)
            vr = vu + 2.0 * (vc - vu)
        else:
            vr = run("teacher", xs, s, rows)
        target = x_hat - s * (vr - run("fake", xs, s, rows))
    loss = ((x_hat - target).square() + 4e-3 ** 2).sqrt().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params["student"], 2.0)
    opt["student"].step()
    opt["student"].zero_grad(set_to_none=True)
    return float(loss.detach())


def _measure(h: Harness, mode: str, checkpointing: bool, batch: int, rank: int, cfg: bool) -> dict:
    import copy

    torch.manual_seed(0)
    base = h.model.eval().requires_grad_(False)
    hook = None
    if mode == "lora":
        from peft import LoraConfig

        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters is the point
        for a in ("student", "fake"):
            base.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                        init_lora_weights="gaussian"), adapter_name=a)
        nets = {"student": base, "fake": base, "teacher": base}
        params = {a: [p for n, p in base.named_parameters() if f".{a}." in n] for a in ("student", "fake")}
    else:
        nets = {"teacher": base, "student": copy.deepcopy(base), "fake": copy.deepcopy(base)}
        params = {a: list(nets[a].parameters()) for a in ("student", "fake")}
    for a in ("student", "fake"):
        for p in params[a]:
            p.requires_grad_(True)
        if checkpointing:
            nets[a].enable_gradient_checkpointing()  # torch.utils.checkpoint per block (non-reentrant)
    comp = Comp(h.arch.width)
    opt = {"student": torch.optim.AdamW(params["student"] + list(comp.parameters()), lr=1e-5),
           "fake": torch.optim.AdamW(params["fake"], lr=1e-5)}
    use_comp = {"on": False}
    hook = nets["student"].norm_out.register_forward_pre_hook(
        lambda m, args: ((comp(args[0]),) + tuple(args[1:])) if use_comp["on"] else None)

    def run(role, x, s, rows):
        if mode == "lora":
            if role == "teacher":
                base.disable_adapters()
            else:
                base.enable_adapters()
                base.set_adapter(role)
                for a in ("student", "fake"):  # set_adapter only trains the active one; both stay trainable
                    for p in params[a]:
                        p.requires_grad_(True)
        use_comp["on"] = role == "student" and torch.is_grad_enabled()
        return h.velocity(nets[role], x, s, rows)

    rows = torch.randint(1, 4, (batch,))

    def step():
        dmd_step(run, params, opt, torch.randn(batch, *h.latent), rows, 0.6, cfg)

    step()  # AdamW allocates its states on the first step
    alive = [p for n in {id(v): v for v in nets.values()}.values() for p in list(n.parameters()) + list(n.buffers())]
    alive += list(comp.parameters()) + h.extra
    alive += [t for o in opt.values() for st in o.state.values() for t in st.values()]
    baseline = _storage_bytes(alive)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    hook.remove()
    setup = M.Setup(arch=replace(h.arch, params=h.arch.params or _base_params(base)),
                    resolution=h.resolution, batch=batch, dtype="fp32", mode=mode, lora_rank=rank,
                    checkpointing=checkpointing, text_tokens=h.text_tokens, compensation_streams=1, device="cpu",
                    cfg=cfg)
    pred = M.predict(setup)
    measured = baseline + peak
    return {"model": h.name, "mode": mode, "ckpt": checkpointing, "batch": batch, "measured": measured,
            "predicted": pred.peak, "error": pred.peak / measured - 1, "phase": pred.phase}


def _base_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


CONFIGS = [(m, mode, ck) for m in ("demo", "sd3", "sd3.5", "flux", "hunyuan_video")
           for mode in ("full", "lora") for ck in (False, True)]
QUICK = [("demo", "lora", False), ("sd3", "full", True), ("flux", "lora", True), ("hunyuan_video", "full", False)]


def bench(configs, batch: int = 2) -> list[dict]:
    out = []
    for name, mode, ck in configs:
        out.append(measure(tiny(name), mode, ck, batch=batch))  # a fresh model per configuration
    return out


def big_model_plans() -> list[tuple[str, str, object]]:
    rows = []
    for name, kw in (("sd3.5-medium", {}), ("sd3.5-large", {}), ("flux.1-dev", {}),
                     ("hunyuan-video", {"resolution": (720, 1280), "frames": 33})):
        for label, budget, gpus in (("1 x 24 GB", 24, 1), ("1 x 80 GB", 80, 1), ("8 x 80 GB", 80, 8)):
            # budgets in GB as sold (24e9, 80e9 bytes) expressed in GiB
            setup = M.model_setup(name, gpus=gpus, batch=4 if gpus > 1 else 1, **kw)
            rows.append((name, label, M.plan(setup, budget * 1e9 / M.GIB)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the four configurations the tests measure")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-big", action="store_true", help="skip the published-model plans")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    print("| model | mode | checkpointing | batch | measured MiB | predicted MiB | error | predicted peak phase |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in bench(QUICK if args.quick else CONFIGS, args.batch):
        worst = max(worst, abs(r["error"]))
        print(f"| {r['model']} | {r['mode']} | {'on' if r['ckpt'] else 'off'} | {r['batch']} | "
              f"{r['measured'] / 2**20:.2f} | {r['predicted'] / 2**20:.2f} | {r['error']:+.1%} | {r['phase']} |")
    print(f"\nworst relative error {worst:.1%} ({time.time() - t0:.0f} s)\n")
    if not args.no_big:
        print("| model | GPUs | fits | planner's choice / refusal |")
        print("|---|---|---|---|")
        for name, label, p in big_model_plans():
            print(f"| {name} | {label} | {'yes' if p.fits else 'no'} | {p.message} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
