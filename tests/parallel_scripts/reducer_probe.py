"""How DDP's reducer behaves when two roles' trainable parameters hang off ONE shared frozen base (torch 2.13, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 reducer_probe.py OUT.json

A toy "base": a frozen linear layer with two additive low-rank adapters, "student" and "fake"; a role's loss runs
the base with its adapter only. Rank r's rows are its half of a global batch; each case records whether a
backward worked, whether the gradients equal the single-process gradient of the mean loss over the whole batch,
what the other role's .grad became, and how many gradient elements DDP all-reduced (a counting comm hook).
Cases:
  view      - one DDP per role over a module that registers only that role's parameters (parallel.wrap_role)
  whole     - one DDP over the base (both roles), find_unused_parameters=True
  whole_strict - the same without find_unused_parameters: the other role never gets a gradient
  two_whole - one DDP per role, each over the whole base (both roles in both reducers), find_unused=True
  leak      - view wrappers, but the student's loss (wrongly) runs the fake adapter *with* grad: the fake
              reducer receives hooks outside its own forward/backward
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from distill_core import parallel as P


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Linear(6, 6).requires_grad_(False)
        self.adapters = nn.ModuleDict({r: nn.Sequential(nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False))
                                       for r in ("student", "fake")})

    def forward(self, x, role):
        return self.w(x) + (self.adapters[role](x) if role else 0.0)


def loss_of(base, x, role, leak=False):
    y = base(x, role)
    if leak:  # the fake score's forward inside the student's loss, mistakenly with grad
        y = y + 0.1 * base(x, "fake")
    return y.square().mean()


def role_params(base, role):
    return list(base.adapters[role].parameters())


def reference(x, role, leak=False):
    base = Base()
    loss_of(base, x, role, leak).backward()
    return {r: [p.grad for p in role_params(base, r)] for r in ("student", "fake")}


def counting(counter):
    def hook(state, bucket):
        counter[0] += bucket.buffer().numel()
        return allreduce_hook(state, bucket)
    return hook


class Whole(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x, role, leak=False):
        return loss_of(self.base, x, role, leak)


def run_case(name, d, x_all):
    base = Base()
    n = len(x_all) // d.world
    x = x_all[d.rank * n:(d.rank + 1) * n]
    counters = {r: [0] for r in ("student", "fake")}
    if name in ("view", "leak"):
        steps = {r: P.wrap_role(lambda x, r=r: loss_of(base, x, r, leak=(name == "leak" and r == "student")),
                                role_params(base, r), d) for r in ("student", "fake")}
        for r, s in steps.items():
            s.register_comm_hook(None, counting(counters[r]))
        call = {r: (lambda x, r=r: steps[r](x)) for r in steps}
    elif name in ("whole", "whole_strict"):
        ddp = DDP(Whole(base), find_unused_parameters=(name == "whole"))
        ddp.register_comm_hook(None, counting(counters["student"]))
        call = {r: (lambda x, r=r: ddp(x, r)) for r in ("student", "fake")}
        counters["fake"] = counters["student"]
    else:  # two_whole
        ddps = {r: DDP(Whole(base), find_unused_parameters=True) for r in ("student", "fake")}
        for r, m in ddps.items():
            m.register_comm_hook(None, counting(counters[r]))
        call = {r: (lambda x, r=r: ddps[r](x, r)) for r in ddps}
    out = []
    for role in ("fake", "student", "fake", "student"):
        for p in base.parameters():
            p.grad = None
        before = {r: counters[r][0] for r in counters}
        entry = {"role": role}
        try:
            call[role](x).backward()
            entry["ok"] = True
        except Exception as e:  # noqa: BLE001 - the point is to record what DDP says
            entry.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            out.append(entry)
            break
        ref = reference(x_all, role, leak=(name == "leak" and role == "student"))
        for r in ("student", "fake"):
            grads = [p.grad for p in role_params(base, r)]
            if all(g is None for g in grads):
                entry[f"{r}_grad"] = "none"
            elif all(g is not None and torch.allclose(g, gr, atol=1e-7) for g, gr in zip(grads, ref[r])):
                entry[f"{r}_grad"] = "equals single process"
            else:
                entry[f"{r}_grad"] = "differs from single process"
        unique = {id(c): r for r, c in counters.items()}.values()  # "whole" has one counter under both names
        entry["reduced_elements"] = sum(counters[r][0] - before[r] for r in unique)
        out.append(entry)
    return out


def main():
    d = P.init_distributed("cpu")
    torch.manual_seed(1)
    x_all = torch.randn(8, 6)
    result = {}
    for name in ("view", "whole", "whole_strict", "two_whole", "leak"):
        result[name] = run_case(name, d, x_all)
        dist.barrier()
    if d.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    P.shutdown(synchronize=True)


if __name__ == "__main__":
    main()
