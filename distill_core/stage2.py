"""Stage II: inference-consistent adversarial refinement.

The generator runs exactly the deployed 2-step sampler: step 1 with the full network (no grad, records the
cached segment's delta), step 2 with the cached blocks skipped and the compensation MLP applied (with grad).
The discriminator compares its output with a separately distilled 4-step Stage-I student's output from the
same noise. Schedule: discriminator-only warm-up, then one generator update every ``g_every`` iterations
(discriminator otherwise); during the compensation warm-up only the MLP is stepped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .cache import CacheRange, Compensation, recording, replaying
from .conditioning import PromptCursor, PromptSet
from .discriminator import Discriminator, TeacherFeatures, multilevel_bce
from .flow import euler, student_schedule, teacher_grid
from .nets import Role
from .student import Student, blocks_of, run_student
from .updates import Ranks, guarded_update, place_shared_base


@dataclass
class Stage2Config:
    steps: int = 2
    shift: float = 3.0
    cache_first: int | None = 1  # None: no cache (a plain 2-NFE student)
    cache_last: int | None = 3
    lr_student: float = 1e-5
    lr_disc: float = 1e-4
    lr_comp: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1e-4
    clip: float = 2.0
    disc_warmup: int = 50  # iterations with discriminator updates only
    comp_warmup: int = 100  # iterations (from the start) in which only the compensation MLP is stepped
    g_every: int = 3  # after the warm-up: generator when iteration % g_every == 0, discriminator otherwise
    real_label: float = 0.8
    disc_blocks: tuple[int, ...] = (3, 7, 11)
    disc_sigma_max: float = 0.3
    output_weight: float = 0.0  # optional MSE of the cached step's output against the full step's (0 as released)

    @property
    def cache(self) -> CacheRange | None:
        if self.cache_first is None or self.cache_last is None:  # a pair: both or neither (config rules)
            return None
        return CacheRange(self.cache_first, self.cache_last)


class Stage2:
    def __init__(
        self,
        cfg: Stage2Config,
        student: Role,
        reference: Student,
        teacher: Role,
        prompts: PromptSet,
        ranks: Ranks,
        seed: int = 0,
        init_compensation: dict | None = None,
    ):
        self.cfg, self.student, self.reference, self.ranks = cfg, student, reference, ranks
        self.prompts, self.cursor = prompts, PromptCursor(len(prompts), seed, ranks.rank, ranks.world)
        self.device = next(student.module.parameters()).device
        self.latent_shape = student.flow.latent_shape
        self.blocks = blocks_of(student)
        grid = teacher_grid(cfg.shift)
        self.sigmas = [float(grid[i]) for i in student_schedule(cfg.steps, cfg.shift, grid)]
        self.cache = cfg.cache
        self.compensation = Compensation(student.width).to(self.device) if self.cache else None
        if self.compensation is not None and init_compensation is not None:  # co-trained in Stage I: continue from it
            self.compensation.load_state_dict(init_compensation)
        # FSDP2: the shared base (and the compensation) sharded before the optimisers; the heads stay replicated (DDP)
        place_shared_base(ranks, student, [self.compensation.img, self.compensation.txt] if self.compensation else [])
        self.disc = Discriminator(TeacherFeatures(teacher, cfg.disc_blocks, cfg.disc_sigma_max))
        self.disc.heads.to(self.device)
        self.disc.pooled.to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.student_params = student.trainable()
        self.comp_params = list(self.compensation.parameters()) if self.compensation else []
        self.disc_params = list(self.disc.trainable().parameters())
        self.optimizers = {
            "student": ranks.adamw(self.student_params, cfg.lr_student, betas, cfg.weight_decay),
            "disc": ranks.adamw(self.disc_params, cfg.lr_disc, betas, cfg.weight_decay),
        }
        self.modules = {"student": student.state(), "disc": self.disc.trainable()}
        if self.compensation:
            self.optimizers["comp"] = ranks.adamw(self.comp_params, cfg.lr_comp, betas, cfg.weight_decay)
            self.modules["comp"] = self.compensation
        # each role's loss is one module call: DDP under torchrun averages exactly that role's gradients
        self.generator_objective = ranks.objective(self._generator_loss, self.student_params + self.comp_params)
        self.disc_objective = ranks.objective(self._disc_loss, self.disc_params, sharded=False)

    def _sigma(self, value: float, n: int) -> torch.Tensor:
        return torch.full((n,), value, device=self.device)

    def _first_step(self, z, cond):
        """Step 1 of the deployed sampler (no grad): x after step 1 and the cached segment's delta."""
        s0, s1 = self.sigmas[0], self.sigmas[1]
        with torch.no_grad():
            ctx = recording(self.blocks, self.cache) if self.cache else contextlib.nullcontext({})
            with ctx as store:
                v0 = self.student(z, self._sigma(s0, len(z)), cond)
            return euler(z, v0, s0, s1), dict(store)

    def _last_step(self, x1, delta, cond):
        s1 = self.sigmas[1]
        ctx = replaying(self.blocks, self.cache, delta, self.compensation) if self.cache else contextlib.nullcontext()
        with ctx:
            v1 = self.student(x1, self._sigma(s1, len(x1)), cond)
        return euler(x1, v1, s1, 0.0)

    def step(self, iteration: int, batch: int, gen: torch.Generator) -> dict:
        cfg = self.cfg
        z = torch.randn(batch, *self.latent_shape, generator=gen).to(self.device)
        cond = self.prompts.batch(self.cursor.next(batch)).to(self.device)
        x1, delta = self._first_step(z, cond)
        if iteration >= cfg.disc_warmup and iteration % cfg.g_every == 0:
            loss = self.generator_objective(x1, delta, cond, gen)
            train_student = iteration >= cfg.comp_warmup or self.compensation is None
            steps = [(self.student_params, self.optimizers["student"], train_student)]
            if self.compensation:
                steps.append((self.comp_params, self.optimizers["comp"], True))
            norm = guarded_update(loss, steps, cfg.clip, self.ranks)
            return {"loss_g": loss.item(), "grad_g": norm}
        with torch.no_grad():
            real = run_student(self.reference.net, z, cond, self.reference.sigmas)
            fake = self._last_step(x1, delta, cond)
        loss = self.disc_objective(real, fake, cond, gen)
        norm = guarded_update(loss, [(self.disc_params, self.optimizers["disc"], True)], cfg.clip, self.ranks)
        return {"loss_d": loss.item(), "grad_d": norm}

    def _generator_loss(self, x1, delta, cond, gen) -> torch.Tensor:
        """The deployed cached last step judged by the discriminator (one DDP forward under torchrun)."""
        cfg = self.cfg
        fake = self._last_step(x1, delta, cond)
        loss = multilevel_bce(self.disc(fake, cond, gen), cfg.real_label)
        if cfg.output_weight and self.cache:
            with torch.no_grad():
                full = euler(x1, self.student(x1, self._sigma(self.sigmas[1], len(x1)), cond), self.sigmas[1], 0.0)
            loss = loss + cfg.output_weight * torch.nn.functional.mse_loss(fake, full)
        return loss

    def _disc_loss(self, real, fake, cond, gen) -> torch.Tensor:
        return multilevel_bce(self.disc(real, cond, gen), self.cfg.real_label) + multilevel_bce(
            self.disc(fake, cond, gen), 0.0
        )
