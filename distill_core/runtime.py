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

from xslim_lab.demo_model.grid import class_noise, images_to_grid
from xslim_lab.demo_model.latents import latent_to_image
from xslim_lab.demo_model.teacher import CLASSES, default_weights_path, load_teacher

from .config import RunConfig
from .jobfiles import RunLock, check_resume
from .nets import frozen_teacher, trainable_copy
from .stage1 import Stage1
from .stage2 import Stage2
from .state import load_module, load_state, save_state
from .student import file_hash, file_signature, load_student, run_student, save_student
from .updates import Ranks

STATE_FILE, STUDENT_FILE, METRICS_FILE = "state.safetensors", "student.safetensors", "metrics.jsonl"


def build_task(cfg: RunConfig, ranks: Ranks):
    """The stage object (modules, optimizers, step) and the base-model description for the student file."""
    teacher_path = cfg.teacher or default_weights_path()
    teacher = load_teacher(teacher_path)
    base = {"family": teacher.meta.get("family", "unknown"), "hash": file_hash(teacher_path),
            "architecture": teacher.meta["architecture"], "signature": file_signature(teacher_path)}
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    frozen = frozen_teacher(teacher)
    if cfg.stage == "stage1":
        student, fake = trainable_copy(teacher), trainable_copy(teacher)
        if cfg.init_student:  # e.g. Distill-Cache co-training as a fine-tune of a finished Stage-I run
            student.model.load_state_dict(load_student(cfg.init_student, base_hash=base["hash"]).net.model.state_dict())
        if cfg.init_fake:
            fake.model.load_state_dict(load_module(cfg.init_fake, "fake"))
        task = Stage1(cfg.stage1, student, fake, frozen, ranks)
    else:
        init = load_student(cfg.init_student, base_hash=base["hash"])
        student = trainable_copy(teacher)
        student.model.load_state_dict(init.net.model.state_dict())
        reference = load_student(cfg.reference, base_hash=base["hash"])
        task = Stage2(cfg.stage2, student, reference, frozen, ranks)
        if init.compensation is not None and init.cache == task.cache:  # co-trained in Stage I: continue from it
            task.compensation.load_state_dict(init.compensation.state_dict())
    return task, base


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
    def __init__(self, cfg: RunConfig, ranks: Ranks):
        self.cfg, self.ranks = cfg, ranks
        self.task, self.base = build_task(cfg, ranks)
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
                    "base_hash": self.base["hash"]}
            save_state(self.path, self.task.modules, self.task.optimizers, rng, meta)
        return True

    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.task
        with torch.no_grad():
            return run_student(t.student, noise, labels, t.sigmas, t.cache, t.compensation)

    def preview(self) -> None:
        noise, labels = class_noise(4, seed=1234)
        images = latent_to_image(self.sample(noise, labels))
        os.makedirs(os.path.join(self.cfg.run_dir, "previews"), exist_ok=True)
        images_to_grid(images, len(CLASSES), CLASSES).save(os.path.join(self.cfg.run_dir, "previews", f"{self.iteration:05d}.png"))

    def export(self) -> str:
        t, path = self.task, os.path.join(self.cfg.run_dir, STUDENT_FILE)
        save_student(path, t.student, t.sigmas, t.cfg.shift, t.cache, t.compensation, self.base,
                     extra={"stage": self.cfg.stage, "iterations": self.iteration})
        return path


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(cfg: RunConfig, progress: Callable[[dict], None] | None = None, stop=None) -> dict:
    """Train (or resume) one stage; returns {"status": done|stopped|failed, "iteration", "message", "student"}."""
    torch.set_num_threads(max(1, min(cfg.threads, torch.get_num_threads())))
    ranks = Ranks()
    os.makedirs(cfg.run_dir, exist_ok=True)
    # one writer per run folder (a ComfyUI worker already holds the lock of its own folder)
    lock = RunLock(cfg.run_dir).acquire() if ranks.is_main and not RunLock.held_here(cfg.run_dir) else None
    try:
        teacher = cfg.teacher or default_weights_path()
        check_resume(cfg.run_dir, asdict(cfg), {"name": os.path.basename(teacher), "hash": file_hash(teacher)}, write=ranks.is_main)
        return _train(cfg, ranks, progress, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, ranks: Ranks, progress, stop) -> dict:
    run = Run(cfg, ranks)
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
