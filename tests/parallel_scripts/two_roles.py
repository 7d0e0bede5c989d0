"""Alternating fake-score / student updates of two peft LoRA adapters on ONE tiny random FLUX base, in 1 process
or under torchrun (DDP per role, or FSDP2). Used by tests/test_parallel.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 two_roles.py --mode ddp --out r.pt
    python two_roles.py --mode single --out r.pt        # the reference: one process, the whole global batch

The DMD-shaped step (simplified losses, the real structure): the fake step is one forward with the fake adapter;
the student step runs, inside ONE call of the wrapped role, a full forward on the even global rows and, on the
odd ones, a no-grad full step followed by a cached step (double block 1 and single block 0 skipped, the
compensation module applied) with grad, then no-grad forwards of the teacher (adapters disabled, CFG rows)
and the fake score. Every random number is drawn per global batch from a per-step seed, so each rank's rows
are exactly its slice of what the single process draws.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings

import torch
from torch import nn

from distill_core import parallel as P
from xslim_core.hooks import wrap_forward

GLOBAL_BATCH = 4
TOKENS, CHANNELS, TEXT, WIDTH = 16, 8, 4, 16
TARGETS = r".*(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|" \
          r"add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
ROLES = ("student", "fake")


def build(adapter_seed: int):
    """Base weights from seed 0 on every rank (as if loaded from one file); adapters and the compensation from
    ``adapter_seed`` (rank-dependent on purpose: DDP's first broadcast / rank 0's load must make them equal)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    base = FluxTransformer2DModel(patch_size=1, in_channels=CHANNELS, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=[2, 2, 4]).requires_grad_(False)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters is the point
    for role in ROLES:
        base.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name=role)
    torch.manual_seed(adapter_seed)
    roles = {r: [p for n, p in base.named_parameters() if f".{r}." in n] for r in ROLES}
    with torch.no_grad():
        for p in roles["student"] + roles["fake"]:  # lora_B starts at zero; random B gives every tensor a gradient
            p.normal_(0, 0.1)
    comp = nn.Linear(WIDTH, WIDTH)
    P.keep_trainable(roles["student"] + roles["fake"])
    roles["student"] = roles["student"] + list(comp.parameters())
    net = nn.ModuleDict({"base": base, "comp": comp})  # one namespace for state dicts (base.* and comp.*)
    return net, roles


class Conditioning:
    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.ctx, self.pooled = torch.randn(3, TEXT, 16, generator=g), torch.randn(3, 16, generator=g)  # 0 = uncond
        side = int(TOKENS ** 0.5)
        r, c = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
        self.img_ids = torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3)
        self.txt_ids = torch.zeros(TEXT, 3)


def velocity(base, cond, x, sigma, prompts):
    return base(hidden_states=x, encoder_hidden_states=cond.ctx[prompts], pooled_projections=cond.pooled[prompts],
                timestep=sigma, img_ids=cond.img_ids, txt_ids=cond.txt_ids, return_dict=False)[0]


def use(net, roles, role):
    """Switch the shared base to a role (None = teacher: adapters off); peft clears requires_grad on inactive
    adapters, so put it back (parallel.keep_trainable says why)."""
    base = net["base"]
    if role is None:
        base.disable_adapters()
    else:
        base.enable_adapters()
        base.set_adapter(role)
    P.keep_trainable(roles["student"] + roles["fake"])


def cached(net):
    """The student's cached step: double block 1 returns its input + comp(input) on the image stream, single
    block 0 is skipped (both still *called*, as the X-Slim engine's wrapped forwards are)."""
    base, comp = net["base"], net["comp"]

    def first(inner, *a, hidden_states, encoder_hidden_states, **k):
        return encoder_hidden_states, hidden_states + comp(hidden_states)

    def skip(inner, *a, hidden_states, encoder_hidden_states, **k):
        return encoder_hidden_states, hidden_states

    return [wrap_forward(base.transformer_blocks[1], first), wrap_forward(base.single_transformer_blocks[0], skip)]


def fake_loss(net, roles, cond, batch):
    use(net, roles, "fake")
    v = velocity(net["base"], cond, batch["x_sigma"], batch["sigma"], batch["prompt"])
    return (v - batch["v_target"]).square().mean()


def rows_or_dummy(mask, pad: bool):
    """The rows of one sub-forward. A rank may have none (here rank 0 has no cached rows, rank 1 no full ones).
    DDP is fine with a rank skipping a call; under FSDP2 every call all-gathers, so every rank must make it:
    then run one dummy row and give it weight 0 (diffusers models reject an empty batch)."""
    if mask.any() or not pad:
        return mask, 1.0
    return torch.arange(len(mask)) == 0, 0.0


def student_loss(net, roles, cond, batch, pad: bool):
    base = net["base"]
    use(net, roles, "student")
    (full, w_full), (cache, w_cache) = rows_or_dummy(batch["full"], pad), rows_or_dummy(~batch["full"], pad)
    z, p, ones = batch["z"], batch["prompt"], torch.ones(len(batch["z"]))
    parts = []
    if full.any():
        parts.append((full, w_full, z[full] - 0.25 * velocity(base, cond, z[full], ones[full], p[full])))  # with grad
    if cache.any():
        with torch.no_grad():
            x1 = z[cache] - 0.25 * velocity(base, cond, z[cache], ones[cache], p[cache])
        undo = cached(net)
        try:  # the last window through the cached step, with grad
            parts.append((cache, w_cache, x1 - 0.75 * velocity(base, cond, x1, 0.75 * ones[cache], p[cache])))
        finally:
            for u in reversed(undo):
                u()
    dummy = sum(0.0 * x.sum() for _, w, x in parts if w == 0.0)  # keeps the dummy rows in the graph, adds nothing
    parts = [(m, x) for m, w, x in parts if w != 0.0]
    x_hat = torch.cat([x for _, x in parts])
    rows = torch.cat([p[m] for m, _ in parts])
    s = torch.cat([batch["s"][m] for m, _ in parts])
    eps = torch.cat([batch["eps"][m] for m, _ in parts])
    with torch.no_grad():
        x_s = (1 - s)[:, None, None] * x_hat + s[:, None, None] * eps
        use(net, roles, None)
        vc, vu = velocity(base, cond, torch.cat([x_s, x_s]), torch.cat([s, s]), torch.cat([rows, 0 * rows])).chunk(2)
        use(net, roles, "fake")
        vf = velocity(base, cond, x_s, s, rows)
        target = x_hat - s[:, None, None] * (vu + 2.0 * (vc - vu) - vf)
    use(net, roles, "student")
    return (((x_hat - target).square() + 4e-3 ** 2).sqrt() - 4e-3).mean() + dummy


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    b = GLOBAL_BATCH
    return {"z": torch.randn(b, TOKENS, CHANNELS, generator=g), "eps": torch.randn(b, TOKENS, CHANNELS, generator=g),
            "sigma": torch.rand(b, generator=g) * 0.9 + 0.05, "s": torch.rand(b, generator=g) * 0.9 + 0.05,
            "prompt": torch.randint(1, 3, (b,), generator=g), "full": torch.arange(b) < b // 2}


def local(batch, d: P.Dist):
    n = GLOBAL_BATCH // d.world
    return {k: v[d.rank * n:(d.rank + 1) * n] for k, v in batch.items()}


def checkpoint(net, opts, d, step):
    state = {"step": step, "model": P.full_state_dict(net, d, trainable_only=True)}  # adapters + compensation
    state["optim"] = {r: P.full_optimizer_state(net, opts[r], d) for r in ROLES}
    return state


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("single", "ddp", "fsdp"), required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", help="write the full training state here after every step (rank 0, atomically)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-at", type=int, default=-1, help="that rank SIGKILLs itself at the start of this step")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (keeps the run alive for the kill test)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = P.init_distributed("cpu")
    ended_together = False
    try:
        code = run(a, d)
        ended_together = True
        return code
    finally:
        P.shutdown(synchronize=ended_together)


def run(a, d: P.Dist):
    net, roles = build(adapter_seed=100 + d.rank)
    cond = Conditioning()
    dense_base_bytes = sum(p.numel() * p.element_size() for n, p in net["base"].named_parameters() if "lora_" not in n)
    ids = {id(p): n for n, p in net.named_parameters()}
    names = {r: [ids[id(p)] for p in roles[r]] for r in ROLES}
    init = P.full_state_dict(net, d) if a.mode == "fsdp" else None  # rank 0's own init, before sharding
    if a.mode == "fsdp":
        base = net["base"]
        P.shard(base, list(base.transformer_blocks) + list(base.single_transformer_blocks), d, extra=[net["comp"]])
        P.load_full_state_dict(net, init, d)  # every shard from rank 0's values (what a resume or init file does)
        params = dict(net.named_parameters())  # fully_shard replaced each Parameter by a DTensor one: look up again
        roles = {r: [params[n] for n in names[r]] for r in ROLES}
    opts = {"student": torch.optim.AdamW(roles["student"], lr=1e-3), "fake": torch.optim.AdamW(roles["fake"], lr=8e-3)}
    if a.mode == "ddp":  # one DDP per role, over that role's parameters only
        steps = {"fake": P.wrap_role(lambda b: fake_loss(net, roles, cond, b), roles["fake"], d),
                 "student": P.wrap_role(lambda b: student_loss(net, roles, cond, b, pad=False), roles["student"], d)}
    else:  # FSDP2 or a single process: call the loss directly (FSDP's hooks live on the modules)
        steps = {"fake": lambda b: fake_loss(net, roles, cond, b),
                 "student": lambda b: student_loss(net, roles, cond, b, pad=True)}
    start, losses, grads = 0, [], []
    if a.resume:
        state = torch.load(a.ckpt, weights_only=False) if d.is_main else {}
        objs = [state.get("step"), state.get("optim")]
        if d.distributed:
            torch.distributed.broadcast_object_list(objs, 0)
        start = objs[0]
        P.load_full_state_dict(net, state.get("model", {}), d)
        for r in ROLES:
            P.load_full_optimizer_state(net, opts[r], objs[1][r], d)
        if d.is_main:
            print(f"resumed from step {start}", flush=True)
    for step in range(start, a.steps):
        if d.rank == a.kill_rank and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        batch = local(global_batch(step), d)
        with torch.no_grad():  # backward simulation: the student's own sample, no grad, outside any wrapper
            use(net, roles, "student")
            x0 = batch["z"] - velocity(net["base"], cond, batch["z"], torch.ones(len(batch["z"])), batch["prompt"])
        sig = batch["sigma"][:, None, None]
        batch["x_sigma"], batch["v_target"] = (1 - sig) * x0 + sig * batch["z"], batch["z"] - x0
        for role in ("fake", "student"):
            opts[role].zero_grad(set_to_none=True)
            loss = steps[role](batch)
            loss.backward()
            grads.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                          for n, p in net.named_parameters() if p.grad is not None} if step == start else {})
            P.clip_grad_norm(roles[role], 1.0 if role == "fake" else 2.0)
            opts[role].step()
            losses.append(P.mean(float(loss.detach()), d))
        if a.ckpt:
            state = checkpoint(net, opts, d, step + 1)
            if d.is_main:
                torch.save(state, a.ckpt + ".tmp")
                os.replace(a.ckpt + ".tmp", a.ckpt)
        time.sleep(a.sleep)
    state = checkpoint(net, opts, d, a.steps)
    held = P.storage_bytes(p for n, p in net["base"].named_parameters() if "lora_" not in n)
    everything = P.storage_bytes(list(net.parameters()) + [t for o in opts.values() for s in o.state.values()
                                                          for t in s.values() if torch.is_tensor(t)])
    sizes = [None] * d.world
    if d.distributed:
        torch.distributed.all_gather_object(sizes, {"base": held, "all": everything})
    else:
        sizes = [{"base": held, "all": everything}]
    if d.is_main:
        torch.save({"state": state, "losses": losses, "grads": grads, "sizes": sizes, "world": d.world,
                    "dense_base_bytes": dense_base_bytes, "mode": a.mode}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
