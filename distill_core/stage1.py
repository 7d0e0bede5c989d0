"""Stage I: distribution matching with guidance control (structure-focused, diversity-preserving).

Per iteration: backward-simulate the student's N-step trajectory (no grad); update the fake score on
re-noised points inside a random window (uniform noise level); update the student by the window-wise DMD
target with the teacher's CFG only below the switch level, a pseudo-Huber loss and a per-sample normaliser.
Plain DMD (no guidance control) is the same with the switch at 1, i.e. CFG at every noise level.

Distill-Cache co-training (``cache_first``/``cache_last`` set): the simulated trajectory is the deployed 1.x
sampler (last step with the cached block segment replaced by the compensation MLP), and the student update in
the last window goes through that cached step, so student and compensation learn together what the sampler
will actually run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import CacheRange, Compensation, replaying
from .conditioning import PromptCursor, PromptSet
from .flow import euler, expand, renoise, student_schedule, teacher_grid
from .importance import importance_weights, sample_in_windows
from .models import guided_velocity
from .nets import Role
from .student import blocks_of, merge_rows, trajectory
from .updates import Ranks, guarded_update, place_shared_base


@dataclass
class Stage1Config:
    steps: int = 2
    shift: float = 3.0  # of the teacher grid and of the student schedule
    guidance_scale: float = 2.0
    guidance_switch: float = 0.96  # CFG where sigma <= this; >= 1.0 means CFG everywhere (plain DMD)
    importance_sampling: bool = True
    lr_student: float = 2e-5
    lr_fake: float = 1.6e-4  # 8x the student's, as in the released recipe (TTUR by learning rate)
    fake_updates: int = 1  # fake-score updates per student update
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 1e-4
    clip_student: float = 2.0
    clip_fake: float = 1.0
    huber_c: float = 4e-3
    cache_first: int | None = None  # a cached block range for Distill-Cache co-training (None: every step full)
    cache_last: int | None = None
    lr_comp: float = 3e-4
    classes: list[int] | None = None  # demo teacher: train on these classes only (its prompt set's rows; None: all)
    # DMD's paired regression (distill_core/pairs.py): the deployed sampler's output from a pair's noise against the
    # guided teacher's own sample from it, pseudo-Huber with a per-sample normaliser like the DMD term; 0: off
    regression_weight: float = 0.0
    regression_pairs: int = 512  # pairs per process, made once by the teacher and kept in the run folder
    regression_steps: int = 25  # the teacher's Euler steps for a pair (CFG = guidance_scale at every step)
    regression_batch: int = 4  # pairs per iteration

    @property
    def cache(self) -> CacheRange | None:
        if self.cache_first is None or self.cache_last is None:  # a pair: both or neither (config rules)
            return None
        return CacheRange(self.cache_first, self.cache_last)


def pseudo_huber_dmd_loss(
    x_hat: torch.Tensor, target: torch.Tensor, normaliser: torch.Tensor, c: float
) -> torch.Tensor:
    """mean[(sqrt((x_hat - target)^2 + c^2) - c) / W]; ``target`` and ``normaliser`` carry no gradient."""
    return ((torch.sqrt((x_hat - target).square() + c * c) - c) / normaliser).mean()


def per_sample_scale(difference: torch.Tensor) -> torch.Tensor:
    """Mean absolute value per sample, [B, 1, ...], kept away from 0: the normaliser of both loss terms."""
    return difference.abs().mean(dim=tuple(range(1, difference.dim())), keepdim=True).clamp_min(1e-6)


class Stage1:
    def __init__(
        self,
        cfg: Stage1Config,
        student: Role,
        fake: Role,
        teacher: Role,
        prompts: PromptSet,
        ranks: Ranks,
        seed: int = 0,
    ):
        self.cfg, self.student, self.fake, self.teacher, self.ranks = cfg, student, fake, teacher, ranks
        self.prompts, self.cursor = prompts, PromptCursor(len(prompts), seed, ranks.rank, ranks.world)
        self.device = next(student.module.parameters()).device
        self.latent_shape = student.flow.latent_shape
        self.blocks = blocks_of(student)
        self.grid = teacher_grid(cfg.shift)
        self.indices = student_schedule(cfg.steps, cfg.shift, self.grid)
        self.sigmas = [float(self.grid[i]) for i in self.indices]
        self.weights = importance_weights() if cfg.importance_sampling else None
        betas = (cfg.beta1, cfg.beta2)
        self.cache = cfg.cache
        self.compensation = Compensation(student.width).to(self.device) if self.cache else None
        # FSDP2 (parallel="fsdp" under torchrun): shard the shared base before any optimiser exists, and make every
        # rank call the same modules in the same order (``pad``: both passes of a split batch always run)
        place_shared_base(ranks, student, [self.compensation.img, self.compensation.txt] if self.compensation else [])
        self.pad = ranks.fsdp
        self.student_params, self.fake_params = student.trainable(), fake.trainable()
        self.optimizers = {
            "student": ranks.adamw(self.student_params, cfg.lr_student, betas, cfg.weight_decay),
            "fake": ranks.adamw(self.fake_params, cfg.lr_fake, betas, cfg.weight_decay),
        }
        self.modules = {"student": student.state(), "fake": fake.state()}
        self.pairs: dict[str, torch.Tensor] | None = None  # set by use_pairs when regression_weight > 0
        self.last_regression: float | None = None
        if self.compensation:
            self.comp_params = list(self.compensation.parameters())
            self.optimizers["comp"] = ranks.adamw(self.comp_params, cfg.lr_comp, betas, cfg.weight_decay)
            self.modules["comp"] = self.compensation
        # each role's loss is one module call: DDP under torchrun averages exactly that role's gradients
        self.fake_objective = ranks.objective(self._fake_loss, self.fake_params)
        self.student_objective = ranks.objective(
            self._student_loss, self.student_params + getattr(self, "comp_params", [])
        )

    def use_pairs(self, pairs: dict[str, torch.Tensor]) -> None:
        """Teacher pairs (``pairs.load_or_make_pairs``) for the regression term."""
        self.pairs = pairs

    def _pair_batch(self, gen: torch.Generator):
        """``regression_batch`` pairs drawn with the run's generator: (noise, conditioning, teacher sample), or None."""
        if self.pairs is None or self.cfg.regression_weight == 0:
            return None
        pick = torch.randint(len(self.pairs["index"]), (self.cfg.regression_batch,), generator=gen)
        cond = self.prompts.batch(self.pairs["index"][pick]).to(self.device)
        return self.pairs["noise"][pick].to(self.device), cond, self.pairs["sample"][pick].to(self.device)

    @torch.no_grad()
    def simulate(self, z: torch.Tensor, cond):
        """The student's own (deployed) trajectory from noise: states [N+1, B, ...], velocities [N, B, ...] and
        the cached segment's delta (None without a cache)."""
        xs, vs, delta = trajectory(self.student, z, cond, self.sigmas, self.cache, self.compensation)
        return torch.stack(xs), torch.stack(vs), delta

    def _student_velocity(self, x, sigma, cond, k, delta):
        """The student's velocity as the deployed sampler computes it: rows in the last window replay the cache."""
        cached = k == self.cfg.steps - 1
        if self.pad and self.cache is not None:
            return self._student_velocity_padded(x, sigma, cond, cached, delta)
        if self.cache is None or not bool(cached.any()):
            return self.student(x, sigma, cond)
        full, rows = (~cached).nonzero().flatten(), cached.nonzero().flatten()
        kept = {n: (None if d is None else d[rows]) for n, d in delta.items()}
        with replaying(self.blocks, self.cache, kept, self.compensation):
            v_cached = self.student(x[rows], sigma[rows], cond.rows(rows))
        if len(full) == 0:
            return v_cached
        v_full = self.student(x[full], sigma[full], cond.rows(full))
        return merge_rows([v_full, v_cached], [full.tolist(), rows.tolist()])

    def _student_velocity_padded(self, x, sigma, cond, cached, delta):
        """``_student_velocity`` for FSDP2, where every rank must make the same module calls: the cached pass, then
        the full pass, always. A rank with no rows of one kind runs that pass on row 0 and adds 0 x its output, so
        the pass is in the graph (its gradients, zero, are reduced like every rank's) and changes nothing."""
        full, rows = (~cached).nonzero().flatten(), cached.nonzero().flatten()
        # what DDP leaves without a gradient, FSDP must too: a pass no rank had rows for (AdamW then skips those
        # parameters instead of stepping them on a zero gradient): the compensation, or the skipped blocks' adapters
        if self.ranks.all_true(len(rows) == 0):
            self._idle += self.comp_params
        if self.ranks.all_true(len(full) == 0):
            skipped = {
                id(p) for spec in self.blocks[self.cache.first : self.cache.last + 1] for p in spec.module.parameters()
            }
            self._idle += [p for p in self.student_params if id(p) in skipped]
        dummy = torch.zeros(1, dtype=torch.long, device=x.device)
        pick_c, pick_f = (rows if len(rows) else dummy), (full if len(full) else dummy)
        kept = {n: (None if d is None else d[pick_c]) for n, d in delta.items()}
        with replaying(self.blocks, self.cache, kept, self.compensation):
            v_cached = self.student(x[pick_c], sigma[pick_c], cond.rows(pick_c))
        v_full = self.student(x[pick_f], sigma[pick_f], cond.rows(pick_f))
        if not len(rows):
            return v_full + 0.0 * v_cached.sum()
        if not len(full):
            return v_cached + 0.0 * v_full.sum()
        return merge_rows([v_full, v_cached], [full.tolist(), rows.tolist()])

    def _windows(self, n: int, gen: torch.Generator, weights):
        k = torch.randint(self.cfg.steps, (n,), generator=gen)
        sigma = self.grid[sample_in_windows(k, self.indices, weights, gen)].float()
        sig = torch.tensor(self.sigmas, dtype=torch.float32)
        on = lambda t: t.to(self.device)
        return on(k), on(sigma), on(sig[k]), on(sig[k + 1])

    def _noise(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device)

    def fake_step(self, xs, vs, cond, gen) -> dict:
        rows = torch.arange(len(cond), device=self.device)
        k, sigma, s_start, s_end = self._windows(len(cond), gen, None)
        with torch.no_grad():
            x_sigma = renoise(xs[k + 1, rows], s_end, sigma, self._noise(xs.shape[1:], gen))
            x0_ref = xs[k, rows] - expand(s_start, x_sigma) * vs[k, rows]
            target = (x_sigma - x0_ref) / expand(sigma, x_sigma)
        loss = self.fake_objective(x_sigma, sigma, cond, target)
        norm = guarded_update(loss, [(self.fake_params, self.optimizers["fake"], True)], self.cfg.clip_fake, self.ranks)
        return {"loss_fake": loss.item(), "grad_fake": norm}

    def _fake_loss(self, x_sigma, sigma, cond, target) -> torch.Tensor:
        return F.mse_loss(self.fake(x_sigma, sigma, cond), target)

    def student_step(self, xs, cond, gen, delta=None) -> dict:
        cfg = self.cfg
        k, sigma, s_start, s_end = self._windows(len(cond), gen, self.weights)
        self._idle: list = []
        loss = self.student_objective(xs, cond, gen, delta, k, sigma, s_start, s_end, self._pair_batch(gen))
        steps = [(self.student_params, self.optimizers["student"], True)]
        if self.compensation:
            steps.append((self.comp_params, self.optimizers["comp"], True))
        norm = guarded_update(loss, steps, cfg.clip_student, self.ranks, idle=self._idle)
        guided = (sigma <= cfg.guidance_switch).float().mean().item()
        metrics = {"loss_student": loss.item(), "grad_student": norm, "cfg_fraction": guided}
        if self.last_regression is not None:
            metrics["regression_gap"] = self.last_regression
        return metrics

    def _student_loss(self, xs, cond, gen, delta, k, sigma, s_start, s_end, pair=None) -> torch.Tensor:
        """The whole student objective as one call (one DDP forward under torchrun): the deployed sampler's
        step in a random window, re-noised, against the guided teacher and the fake score; with ``pair``, plus
        the regression of the deployed sampler's output onto the teacher's sample from the same noise."""
        cfg, rows = self.cfg, torch.arange(len(cond), device=self.device)
        x_hat = euler(xs[k, rows], self._student_velocity(xs[k, rows], s_start, cond, k, delta), s_start, s_end)
        with torch.no_grad():
            x_sigma = renoise(x_hat, s_end, sigma, self._noise(x_hat.shape, gen))
            uncond = self.prompts.uncond.to(self.device)
            v_real = guided_velocity(
                self.teacher, x_sigma, sigma, cond, uncond, cfg.guidance_scale, cfg.guidance_switch, pad=self.pad
            )
            v_fake = self.fake(x_sigma, sigma, cond)
            x_real, x_fake = euler(x_sigma, v_real, sigma, s_end), euler(x_sigma, v_fake, sigma, s_end)
            target = x_hat + x_real - x_fake
            normaliser = per_sample_scale(x_hat - x_real)
        loss = pseudo_huber_dmd_loss(x_hat, target, normaliser, cfg.huber_c)
        if pair is None:
            return loss
        noise, pair_cond, teacher_sample = pair
        xs_pair, _, _ = trajectory(self.student, noise, pair_cond, self.sigmas, self.cache, self.compensation)
        x_out = xs_pair[-1]
        gap = per_sample_scale(x_out.detach() - teacher_sample)
        regression = pseudo_huber_dmd_loss(x_out, teacher_sample, gap, cfg.huber_c)
        self.last_regression = gap.mean().item()  # the distance itself: the normalised loss is ~1 by construction
        return loss + cfg.regression_weight * regression

    def step(self, iteration: int, batch: int, gen: torch.Generator) -> dict:
        z = self._noise((batch, *self.latent_shape), gen)
        cond = self.prompts.batch(self.cursor.next(batch)).to(self.device)
        xs, vs, delta = self.simulate(z, cond)
        metrics = {}
        for _ in range(self.cfg.fake_updates):
            metrics.update(self.fake_step(xs, vs, cond, gen))
        metrics.update(self.student_step(xs, cond, gen, delta))
        return metrics
