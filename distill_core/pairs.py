"""Teacher ODE pairs for Stage I's regression term: (noise, prompt, the guided teacher's sample from that noise).

DMD's distribution-matching gradient is a reverse-KL one: it pulls every student sample towards a mode of the
guided teacher and nothing pulls samples into the modes the student has stopped producing, so recall falls
while accuracy rises. A regression of the student's deployed sampler onto the teacher's own deterministic
sampler from the same noise (DMD's paired regression loss) ties each noise to the sample the teacher would make
from it, so the student keeps covering what the teacher covers. The pairs are made once per process by the frozen
teacher (Euler, CFG at every step, the student's shifted schedule) and kept in the run folder, so a resumed run
reads them instead of sampling again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .conditioning import PromptSet
from .files import save_atomic
from .flow import euler, shift_sigma
from .models import guided_velocity

log = logging.getLogger("xslim.distill.pairs")

PAIRS_FILE = "teacher_pairs.rank{rank}.safetensors"
CHUNK = 32  # rows sampled together: memory stays that of a small batch


def pair_key(settings: PairSettings, prompts: PromptSet) -> str:
    """What the pairs depend on; a file made for other settings or prompts is made again."""
    s = settings
    return f"n{s.count}-steps{s.steps}-shift{s.shift:g}-cfg{s.scale:g}-seed{s.seed}-prompts{prompts.content_hash()}"


@torch.no_grad()
def teacher_sample(
    teacher, noise: torch.Tensor, cond, prompts: PromptSet, steps: int, shift: float, scale: float
) -> torch.Tensor:
    """The teacher's Euler sample from ``noise`` over ``steps`` shifted steps, CFG ``scale`` at every step."""
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
    uncond, x = prompts.uncond.to(noise.device), noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        x = euler(x, guided_velocity(teacher, x, sigma, cond, uncond, scale, 1.0), s, s_next)
    return x


@dataclass(frozen=True)
class PairSettings:
    """How the pairs are made: how many, the teacher's steps, the schedule's shift, the CFG scale, the seed."""

    count: int
    steps: int
    shift: float
    scale: float
    seed: int


def make_pairs(teacher, prompts: PromptSet, latent_shape: tuple, settings: PairSettings, device: torch.device):
    """``count`` pairs: noise [count, ...], prompt index [count], teacher sample [count, ...] (on the CPU)."""
    count, steps, shift, scale = settings.count, settings.steps, settings.shift, settings.scale
    gen = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn((count, *latent_shape), generator=gen)
    index = torch.randint(len(prompts), (count,), generator=gen)
    samples = []
    for start in range(0, count, CHUNK):
        rows = slice(start, start + CHUNK)
        cond = prompts.batch(index[rows]).to(device)
        samples.append(teacher_sample(teacher, noise[rows].to(device), cond, prompts, steps, shift, scale).cpu())
        log.info("teacher pairs: %d/%d sampled (%d steps, CFG %g)", min(start + CHUNK, count), count, steps, scale)
    return {"noise": noise, "index": index, "sample": torch.cat(samples)}


def load_or_make_pairs(
    run_dir: str, rank: int, teacher, prompts: PromptSet, latent_shape: tuple, settings: PairSettings, device
) -> dict[str, torch.Tensor]:
    """This process's pairs from the run folder when they were made for the same settings, else made and kept.
    Each process draws its own noise (seed per rank), so N processes regress onto N x ``count`` pairs."""
    path = os.path.join(run_dir, PAIRS_FILE.format(rank=rank))
    key = pair_key(settings, prompts)
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(path)
        log.info("%s was made for other settings: sampling the teacher pairs again", path)
    own = replace(settings, seed=settings.seed * 1000 + rank)
    pairs = make_pairs(teacher, prompts, latent_shape, own, device)
    save_atomic({k: v.contiguous() for k, v in pairs.items()}, path, {"key": key})
    return pairs
