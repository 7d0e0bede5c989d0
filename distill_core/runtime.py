"""The training runtime: one function for the command line, torchrun and a background worker.

``run_training(config, progress, stop)`` resumes from the run directory when it holds a state, trains with a
tqdm bar, appends metrics.jsonl (losses, grad norms, it/s, ETA), writes previews and atomic checkpoints,
skips non-finite updates and stops after repeated ones (a non-finite model is never written), and exports
the deployable student file at the end. ``stop`` may be a threading.Event or any callable returning bool;
``progress`` receives one dict per iteration, so a ComfyUI node can run this in a thread.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .conditioning import PromptSet
from .config import RunConfig
from .jobfiles import RunLock, check_resume
from .models import Teacher, load_teacher_from
from .nets import build_roles
from .parallel import pick_device
from .stage1 import Stage1
from .stage2 import Stage2
from .state import load_module, load_state, save_state
from .student import load_student, run_student, save_student
from .updates import Ranks

DEMO_LOADER = "xslim_lab.demo_model.distill:load_demo_teacher"
STATE_FILE, STUDENT_FILE, METRICS_FILE = "state.safetensors", "student.safetensors", "metrics.jsonl"


def load_run_teacher(cfg: RunConfig) -> Teacher:
    """The run's base model through its loader, and the prompt set it trains on (the run's own file, else the
    loader's default, e.g. the demo teacher's class names), checked against the model's text widths."""
    options = dict(cfg.teacher_options)
    if cfg.stage1.classes is not None and cfg.teacher_loader == DEMO_LOADER:
        options["classes"] = cfg.stage1.classes
    teacher = load_teacher_from(cfg.teacher_loader, cfg.teacher, options)
    if cfg.prompts:
        teacher.prompts = PromptSet.load(cfg.prompts)
    if teacher.prompts is None:
        raise ValueError("this run has no prompts: give 'prompts', a prompt-set file (conditioning.encode_prompt_set writes one "
                         "with the model's text encoder; the 1.x-Distill Train node does it from its prompt list).")
    context, pooled = teacher.flow.text_dims
    teacher.prompts.check_model(context, pooled, f"the {teacher.flow.family} model")
    teacher.base["prompts"] = teacher.prompts.content_hash()
    return teacher


def build_task(cfg: RunConfig, ranks: Ranks, teacher: Teacher | None = None):
    """The stage object (modules, optimizers, step) and the loaded teacher (base description, previews)."""
    base = teacher.base
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    frozen, student, fake = build_roles(teacher.flow, cfg.lora_rank, cfg.lora_alpha)
    if cfg.stage == "stage1":
        if cfg.init_student:  # e.g. Distill-Cache co-training as a fine-tune of a finished Stage-I run
            student.state().load_state_dict(_role_weights(cfg.init_student, base, student))
        if cfg.init_fake:
            fake.state().load_state_dict(load_module(cfg.init_fake, "fake"))
        task = Stage1(cfg.stage1, student, fake, frozen, teacher.prompts, ranks, cfg.seed)
    else:
        init = load_student(cfg.init_student, base_hash=base["hash"])
        student.state().load_state_dict(_role_weights(cfg.init_student, base, student, init))
        reference = load_student(cfg.reference, base_hash=base["hash"])
        task = Stage2(cfg.stage2, student, reference, frozen, teacher.prompts, ranks, cfg.seed)
        if init.compensation is not None and init.cache == task.cache:  # co-trained in Stage I: continue from it
            task.compensation.load_state_dict(init.compensation.state_dict())
    return task, teacher


def enable_checkpointing(module: torch.nn.Module) -> None:
    """Recompute each block in backward instead of keeping its activations (diffusers' own switch)."""
    if not getattr(module, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(module).__name__} does not support gradient checkpointing; set gradient_checkpointing false.")
    module.enable_gradient_checkpointing()


def _role_weights(path: str, base: dict, role, student=None) -> dict:
    """A finished student's weights for ``role``: the whole transformer (full copies) or, with LoRA, the
    adapter tensors kept in the run's state next to it."""
    if role.lora is None:
        student = student or load_student(path, base_hash=base["hash"])
        return student.net.module.state_dict()
    state = os.path.join(os.path.dirname(os.path.abspath(path)), STATE_FILE)
    if not os.path.exists(state):
        raise ValueError(f"{path}: a LoRA run starts from the adapter in the training state next to the student file "
                         f"({state}), which is missing.")
    return load_module(state, "student")


def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    return stop.is_set() if hasattr(stop, "is_set") else bool(stop())


def _all_finite(modules: dict) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules.values() for p in m.parameters())


def _gather_generator_states(gen: torch.Generator, ranks: Ranks) -> dict[str, torch.Tensor]:
    state = gen.get_state()
    if not ranks.active:
        return {"gen.0": state}
    parts = [torch.empty_like(state) for _ in range(ranks.world)]
    dist.all_gather(parts, state)
    return {f"gen.{r}": s for r, s in enumerate(parts)}


class Run:
    def __init__(self, cfg: RunConfig, ranks: Ranks, teacher: Teacher | None = None):
        self.cfg, self.ranks = cfg, ranks
        self.task, self.teacher = build_task(cfg, ranks, teacher)
        self.base = self.teacher.base
        for module in self.task.modules.values():  # rank 0's initial weights everywhere
            for t in module.state_dict().values():
                ranks.broadcast_(t)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + ranks.rank)
        self.iteration, self.path = 0, os.path.join(cfg.run_dir, STATE_FILE)

    def resume(self) -> bool:
        if not os.path.exists(self.path):
            return False
        rng, meta = load_state(self.path, self.task.modules, self.task.optimizers)
        self.iteration = int(meta["iteration"])
        if "cursor" in meta:
            self.task.cursor.load(json.loads(meta["cursor"]))
        torch.set_rng_state(rng["torch"])
        key = f"gen.{self.ranks.rank}"
        if key in rng and int(meta.get("world", 1)) == self.ranks.world:
            self.gen.set_state(rng[key])
        else:  # a different process count: a fresh, still deterministic stream per rank
            self.gen.manual_seed(self.cfg.seed * 1000 + self.ranks.rank + 7919 * self.iteration)
        return True

    def checkpoint(self) -> bool:
        """Write the state (main process), refusing if any weight is non-finite."""
        if not _all_finite(self.task.modules):
            return False
        rng = _gather_generator_states(self.gen, self.ranks)
        if self.ranks.is_main:
            rng["torch"] = torch.get_rng_state()
            meta = {"iteration": self.iteration, "world": self.ranks.world, "stage": self.cfg.stage, "config": self.cfg.to_json(),
                    "base_hash": self.base["hash"], "prompts_hash": self.base.get("prompts"),
                    "cursor": json.dumps(self.task.cursor.state())}
            save_state(self.path, self.task.modules, self.task.optimizers, rng, meta)
        return True

    def sample(self, noise: torch.Tensor, cond) -> torch.Tensor:
        t = self.task
        with torch.no_grad():
            return run_student(t.student, noise.to(t.device), cond.to(t.device), t.sigmas, t.cache, t.compensation)

    def preview(self) -> None:
        """A picture of what the student makes now: the teacher's own renderer (the demo's class grid) or
        the first latent channels of four samples."""
        render = self.teacher.preview or latent_preview(self.teacher.prompts, self.teacher.flow.latent_shape)
        os.makedirs(os.path.join(self.cfg.run_dir, "previews"), exist_ok=True)
        render(self.sample).save(os.path.join(self.cfg.run_dir, "previews", f"{self.iteration:05d}.png"))

    def export(self) -> str:
        t, path = self.task, os.path.join(self.cfg.run_dir, STUDENT_FILE)
        save_student(path, t.student, t.sigmas, t.cfg.shift, t.cache, t.compensation, self.base,
                     extra={"stage": self.cfg.stage, "iterations": self.iteration, "lora_rank": self.cfg.lora_rank},
                     class_table=self.teacher.class_table)
        return path


def latent_preview(prompts: PromptSet, latent_shape: tuple):
    """For a model without a decoder here: four samples' first three latent channels side by side, as RGB."""
    def render(sample):
        from PIL import Image

        noise = torch.randn((4, *latent_shape), generator=torch.Generator().manual_seed(1234))
        x = sample(noise, prompts.batch(torch.arange(4) % len(prompts))).float().cpu()
        if x.dim() == 3:  # packed tokens [B, N, C]: a square grid of tokens
            side = int(x.shape[1] ** 0.5)
            x = x[:, : side * side].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        if x.dim() == 5:  # video [B, C, F, H, W]: the first frame
            x = x[:, :, 0]
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        tiles = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).byte()
        img = Image.fromarray(torch.cat(list(tiles), dim=2).permute(1, 2, 0).numpy())
        return img.resize((img.width * 8, img.height * 8), Image.NEAREST)

    return render


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the step (weights and optimiser states stay fp32), or nothing for fp32."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(cfg: RunConfig, progress: Callable[[dict], None] | None = None, stop=None) -> dict:
    """Train (or resume) one stage; returns {"status": done|stopped|failed, "iteration", "message", "student"}."""
    torch.set_num_threads(max(1, min(cfg.threads, torch.get_num_threads())))
    ranks = Ranks(pick_device(cfg.device))
    os.makedirs(cfg.run_dir, exist_ok=True)
    # one writer per run folder (a ComfyUI worker already holds the lock of its own folder)
    lock = RunLock(cfg.run_dir).acquire() if ranks.is_main and not RunLock.held_here(cfg.run_dir) else None
    try:
        teacher = load_run_teacher(cfg)
        name = os.path.basename(os.path.normpath(cfg.teacher)) if cfg.teacher else "the shipped demo teacher"
        check_resume(cfg.run_dir, asdict(cfg), {"name": name, "hash": teacher.base["hash"], "prompts": teacher.base["prompts"]},
                     write=ranks.is_main)
        return _train(cfg, ranks, progress, stop, teacher)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, ranks: Ranks, progress, stop, teacher: Teacher) -> dict:
    run = Run(cfg, ranks, teacher)
    resumed = run.resume()
    main = ranks.is_main
    bar = tqdm(total=cfg.iterations, initial=run.iteration, desc=f"1.x-Distill {cfg.stage}", unit="it", disable=not main)
    start, start_it, failures, status, message = time.time(), run.iteration, 0, "done", ""
    if main and resumed:
        message = f"resumed from iteration {run.iteration}"
    while run.iteration < cfg.iterations:
        if _stop_requested(stop) or (cfg.max_minutes and time.time() - start > cfg.max_minutes * 60):
            status = "stopped"
            break
        with autocast(cfg.precision, ranks.device):
            metrics = run.task.step(run.iteration, cfg.batch_size, run.gen)
        run.iteration += 1
        finite = all(math.isfinite(v) for v in metrics.values())
        failures = 0 if finite else failures + 1
        elapsed = time.time() - start
        speed = (run.iteration - start_it) / max(elapsed, 1e-9)
        record = {"iteration": run.iteration, **metrics, "skipped": not finite, "it_per_s": speed,
                  "eta_s": (cfg.iterations - run.iteration) / max(speed, 1e-9), "elapsed_s": elapsed}
        if main:
            _log(os.path.join(cfg.run_dir, METRICS_FILE), record)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")})
        if progress is not None:
            progress(record)
        if failures >= cfg.max_nonfinite:
            status = "failed"
            message = (f"stopped at iteration {run.iteration}: {failures} consecutive non-finite losses or gradients; "
                       f"the last good checkpoint ({run.path}) is kept, no checkpoint was written since")
            break
        if finite and run.iteration % cfg.checkpoint_every == 0:
            run.checkpoint()
        if main and finite and cfg.preview_every and run.iteration % cfg.preview_every == 0:
            run.preview()
    bar.close()
    student = None
    if status != "failed" and run.checkpoint():
        if main:
            student = run.export()
    elif status != "failed":
        status, message = "failed", "the weights are not finite; nothing was written"
    if main and message:
        print(f"[1.x-Distill] {message}")
    return {"status": status, "iteration": run.iteration, "message": message, "student": student}
