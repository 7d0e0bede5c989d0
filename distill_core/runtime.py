"""The training runtime: one function for the command line, torchrun and a background worker.

``run_training(config, progress, stop)`` resumes from the run directory when it holds a state, trains with a
tqdm bar on a terminal (plain progress lines every tenth of the run in a redirected log), appends metrics.jsonl (losses, grad norms, it/s, ETA), writes previews and atomic checkpoints,
skips non-finite updates and stops after repeated ones (a non-finite model is never written), and exports
the deployable student file at the end. ``stop`` may be a threading.Event or any callable returning bool;
``progress`` receives one dict per iteration, so a ComfyUI node can run this in a thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .logs import log

from . import memory as M
from . import parallel as P
from .cache import Compensation
from .conditioning import PromptSet
from .config import RunConfig
from .jobfiles import OpenRun, Pace
from .models import Teacher, load_teacher_from
from .nets import RoleState, build_roles, merged_weights
from .parallel import pick_device
from .pairs import PairSettings, load_or_make_pairs
from .stage1 import Stage1
from .stage2 import Stage2
from .state import load_module, load_state, optimizer_state_dict, read_state, save_state, save_state_dicts
from .student import load_student, run_student, save_student
from .updates import Ranks

from xslim_core.families import REGISTRY
from xslim_core.files import atomic_path

DEMO_LOADER = "xslim_demo.distill:load_demo_teacher"
STATE_FILE, STUDENT_FILE, METRICS_FILE = "state.safetensors", "student.safetensors", "metrics.jsonl"
DIFFUSERS_LOADER = "distill_core.models:load_diffusers_teacher"


class MemoryPlanRefused(ValueError):
    """The memory planner predicts that this run does not fit the memory per process."""


def run_memory_setup(cfg: RunConfig, world: int, device: torch.device):
    """The planner's Setup for this run, from the base model's config and safetensors headers (nothing is loaded),
    or None when the run's loader gives no way to know the shape before loading."""
    cache = cfg.stage1.cache if cfg.stage == "stage1" else cfg.stage2.cache
    common = dict(
        batch=cfg.batch_size,
        mode="lora" if cfg.lora_rank else "full",
        lora_rank=cfg.lora_rank or 64,
        checkpointing=cfg.gradient_checkpointing,
        offload_optimizer=cfg.offload_optimizer,
        gpus=world,
        sharding="none" if world == 1 else cfg.parallel,
        device="cuda" if device.type == "cuda" else "cpu",
        compensation_streams=2 if cache else 0,
        cfg=cfg.stage == "stage1" and cfg.stage1.guidance_scale != 1.0,
        # the loaders give fp32 weights; bf16 autocast only shrinks the activations (planned as fp32: the safe side)
        dtype="fp32",
    )
    if cfg.teacher_loader == DIFFUSERS_LOADER and cfg.teacher:
        text = None
        if cfg.prompts_path and os.path.isfile(cfg.prompts_path):
            shapes = M.safetensors_shapes(cfg.prompts_path)
            context = [shape for name, (_, shape) in shapes.items() if name.endswith("context") and len(shape) == 3]
            text = context[0][1] if context else None
        options = cfg.teacher_options
        return M.diffusers_run_setup(cfg.teacher, options.get("latent_shape", ()), options.get("extra"), text, **common)
    if cfg.teacher_loader == DEMO_LOADER:
        return M.model_setup("demo", resolution=(32, 32), **common)  # 8x8 latent, patch 1: 64 image tokens
    return None


def check_memory(cfg: RunConfig, ranks: Ranks) -> str | None:
    """Before the teacher is loaded: refuse a run the planner predicts will not fit (``memory_budget_gib``, else the
    GPU's memory; no check on a CPU without a budget), naming the reason and the smallest change that fits.
    Returns the prediction line to log, or None when nothing was checked."""
    budget = cfg.memory_budget_gib
    if budget is None and ranks.device.type == "cuda":
        budget = torch.cuda.get_device_properties(ranks.device).total_memory / M.GIB
    if budget is None:
        return None
    setup = run_memory_setup(cfg, ranks.world, ranks.device)
    if setup is None:
        return f"memory plan: skipped (the loader {cfg.teacher_loader} gives no model shape before loading)"
    pred = M.predict(setup)
    where = f"{budget:.3g} GiB {M.per(setup.device)}" + (
        "" if cfg.memory_budget_gib is not None else f" ({ranks.device})"
    )
    if pred.reserved <= budget * M.GIB:
        return f"memory plan: {pred.summary()}; fits {where}"
    alternative = M.plan(setup, budget, allow_lora=True, lora_rank=cfg.lora_rank or 64, allow_offload=False)
    advice = (
        f"Settings that fit: {alternative.prediction.summary()}."
        if alternative.fits
        else f"Nothing the trainer offers fits: {alternative.message}"
    )
    raise MemoryPlanRefused(
        f"memory plan: this run does not fit {where}: it needs {M.size(pred.reserved)} "
        f"({pred.summary()}) [{pred.parts_text()}]. {advice} Nothing was loaded; change the run's settings "
        "(or memory_budget_gib)."
    )


def load_run_teacher(cfg: RunConfig, teacher: Teacher | None = None) -> Teacher:
    """The run's base model through its loader (or ``teacher``, a model a host has loaded already, e.g.
    ComfyUI's), and the prompt set it trains on (the run's own file, else the loader's default, e.g. the demo
    teacher's class names), checked against the model's text widths."""
    if teacher is None:
        options = dict(cfg.teacher_options)
        if cfg.stage1.classes is not None and cfg.teacher_loader == DEMO_LOADER:
            options["classes"] = cfg.stage1.classes
        teacher = load_teacher_from(cfg.teacher_loader, cfg.teacher, options)
    if cfg.prompts_path:
        teacher.prompts = PromptSet.load(cfg.prompts_path)
    if teacher.prompts is None:
        raise ValueError(
            "this run has no prompts: give 'prompts', a prompt-set file (conditioning.encode_prompt_set writes one "
            "with the model's text encoder; the 1.x-Distill Train node does it from its prompt list)."
        )
    context, pooled = teacher.flow.text_dims
    teacher.prompts.check_model(context, pooled, f"the {teacher.flow.family} model")
    teacher.base["prompts"] = teacher.prompts.content_hash()
    teacher.base.setdefault("family", teacher.flow.family)
    return teacher


def embeds_guidance(flow) -> bool:
    """Whether the model takes its guidance as an input (guidance-distilled: FLUX.1-dev, HunyuanVideo): a diffusers
    config's ``guidance_embeds``, a ComfyUI model's ``params.guidance_embed``, else its family's record."""
    module = getattr(flow, "module", None)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "get") and config.get("guidance_embeds") is not None:
        return bool(config.get("guidance_embeds"))
    embed = getattr(getattr(module, "params", None), "guidance_embed", None)
    if embed is not None:
        return bool(embed)
    spec = REGISTRY.get(flow.family)
    return spec is not None and spec.embedded_guidance is not None


def double_guidance_warning(cfg: RunConfig, flow) -> str | None:
    """The warning for real CFG on top of a model's embedded guidance (the teacher is then guided twice), or None."""
    scale = cfg.stage1.guidance_scale
    if cfg.stage != "stage1" or scale <= 1.0 or not embeds_guidance(flow):
        return None
    spec = REGISTRY.get(flow.family)
    name = spec.display_name if spec else flow.family
    embedded = (getattr(flow, "extra", None) or {}).get("guidance", spec.embedded_guidance if spec else None)
    return (
        f"stage1.guidance_scale is {scale:g} on a {name} model that takes its guidance as an input (embedded guidance "
        f"{embedded}): the teacher's real score is then guided twice, by the embedded guidance and by CFG on top. "
        f"Set stage1.guidance_scale to 1 ({name}'s default) unless you mean CFG on top; the embedded value is "
        "teacher_options.extra.guidance."
    )


def build_task(cfg: RunConfig, ranks: Ranks, teacher: Teacher):
    """The stage object (modules, optimizers, step) on the loaded teacher (``load_run_teacher``)."""
    base = teacher.base
    teacher.flow.module.to(ranks.device)  # the stages and their copies of the base follow its device
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    frozen, student, fake = build_roles(teacher.flow, cfg.lora_rank, cfg.lora_alpha, cfg.gradient_checkpointing)
    if cfg.stage == "stage1":
        if cfg.init_student:  # e.g. Distill-Cache co-training as a fine-tune of a finished Stage-I run
            finished = None if student.lora else student_loader(teacher)(cfg.init_student, base_hash=base["hash"])
            student.state().load_state_dict(_role_weights(cfg.init_student, student, finished))
        if cfg.init_fake:
            fake.state().load_state_dict(load_module(cfg.init_fake, "fake"))
        task: Stage1 | Stage2 = Stage1(cfg.stage1, student, fake, frozen, teacher.prompts, ranks, cfg.seed)
    else:
        if cfg.init_student is None or cfg.reference is None:  # RunConfig refuses this; said again for the reader
            raise ValueError("stage2 needs init_student and reference")
        init = student_loader(teacher)(cfg.init_student, base_hash=base["hash"])
        student.state().load_state_dict(_role_weights(cfg.init_student, student, init))
        reference = student_loader(teacher)(cfg.reference, base_hash=base["hash"])
        # co-trained in Stage I: continue from its compensation (loaded before an FSDP run shards it)
        comp = (
            init.compensation.state_dict() if init.compensation is not None and init.cache == cfg.stage2.cache else None
        )
        task = Stage2(cfg.stage2, student, reference, frozen, teacher.prompts, ranks, cfg.seed, init_compensation=comp)
    return task, teacher


def student_loader(teacher: Teacher):
    """How this base model's student files load: a host's own loader (ComfyUI's classes keep their key names),
    else the diffusers one."""
    return getattr(teacher, "student_loader", None) or load_student


def _role_weights(path: str, role, student) -> dict:
    """A finished student's weights for ``role``: the whole transformer of ``student`` (the loaded file, full
    copies) or, with LoRA, the adapter tensors kept in the run's state next to the file."""
    if role.lora is None:
        return student.net.module.state_dict()
    state = os.path.join(os.path.dirname(os.path.abspath(path)), STATE_FILE)
    if not os.path.exists(state):
        raise ValueError(
            f"{path}: a LoRA run starts from the adapter in the training state next to the student file "
            f"({state}), which is missing."
        )
    return load_module(state, "student")


def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    return stop.is_set() if hasattr(stop, "is_set") else bool(stop())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_finite(modules: dict, ranks: Ranks) -> bool:
    finite = all(bool(torch.isfinite(_local(p)).all()) for m in modules.values() for p in m.parameters())
    return ranks.all_true(finite) if ranks.fsdp else finite  # FSDP: each rank sees only its shard


def _gather_generator_states(gen: torch.Generator, ranks: Ranks) -> dict[str, torch.Tensor]:
    state = gen.get_state()
    if not ranks.active:
        return {"gen.0": state}
    parts = [torch.empty_like(state) for _ in range(ranks.world)]
    dist.all_gather(parts, state)
    return {f"gen.{r}": s for r, s in enumerate(parts)}


class Run:
    def __init__(self, cfg: RunConfig, ranks: Ranks, teacher: Teacher):
        self.cfg, self.ranks = cfg, ranks
        self.task, self.teacher = build_task(cfg, ranks, teacher)
        if isinstance(self.task, Stage1) and cfg.stage1.regression_weight > 0:
            s1 = cfg.stage1
            settings = PairSettings(s1.regression_pairs, s1.regression_steps, s1.shift, s1.guidance_scale, cfg.seed)
            t = self.task
            t.use_pairs(
                load_or_make_pairs(
                    cfg.run_dir, ranks.rank, t.teacher, teacher.prompts, t.latent_shape, settings, t.device
                )
            )
        self.base = self.teacher.base
        for module in self.task.modules.values():  # rank 0's initial weights everywhere
            for t in module.state_dict().values():
                if not hasattr(t, "to_local"):  # FSDP shards were made from rank 0's values already
                    ranks.broadcast_(t)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + ranks.rank)
        self.iteration, self.path = 0, os.path.join(cfg.run_dir, STATE_FILE)
        self.sharded: torch.nn.ModuleDict | None = None
        if ranks.fsdp:  # one namespace for the sharded modules' full state dicts: base.* and comp.*
            t = self.task
            self.sharded = torch.nn.ModuleDict(
                {"base": t.student.module, **({"comp": t.compensation} if t.compensation else {})}
            )

    def placement(self) -> str:
        """Under FSDP: how much of the frozen base each rank holds (storage of its shards), for the log."""
        base = [p for n, p in self.task.student.module.named_parameters() if "lora_" not in n]
        held = [None] * self.ranks.world
        dist.all_gather_object(held, P.storage_bytes(base))
        dense = sum(p.numel() * p.element_size() for p in base)
        return f"FSDP over {self.ranks.world} processes: base weight bytes per rank {held} of {dense}"

    @property
    def _fsdp_modules(self) -> torch.nn.ModuleDict:
        """The sharded modules under one namespace; only an FSDP run has them (the callers run only then)."""
        if self.sharded is None:
            raise RuntimeError("not an FSDP run: nothing is sharded")
        return self.sharded

    def _is_sharded(self, opt: torch.optim.Optimizer) -> bool:
        return self.sharded is not None and any(hasattr(p, "to_local") for g in opt.param_groups for p in g["params"])

    def _gathered(self) -> tuple[dict | None, dict | None]:
        """Module and optimiser states as full tensors in the single-process layout, on rank 0 (None elsewhere):
        a collective under FSDP, so a checkpoint written by N processes resumes with any number."""
        t, main = self.task, self.ranks.is_main
        full = P.full_state_dict(self._fsdp_modules, self.ranks, trainable_only=True)
        modules = {}
        for name, module in t.modules.items():
            if isinstance(module, RoleState):
                modules[name] = {k: full[f"base.{k}"] for k in module.named} if main else None
            elif module is t.compensation:
                modules[name] = {k: full[f"comp.{k}"] for k in module.state_dict()} if main else None
            else:  # replicated (Stage II's discriminator heads)
                modules[name] = module.state_dict()
        optimizers = {}
        for name, opt in t.optimizers.items():
            if not self._is_sharded(opt) or not opt.state:  # replicated, or never stepped (only its settings)
                optimizers[name] = opt.state_dict()
                continue
            state = P.full_optimizer_state(self._fsdp_modules, opt, self.ranks)
            if main:  # parameter names -> positions, as a single process numbers them
                order = [n for g in state["param_groups"] for n in g["params"]]
                index = {n: i for i, n in enumerate(order)}
                groups, at = [], 0
                for g in state["param_groups"]:
                    groups.append({**g, "params": list(range(at, at + len(g["params"])))})
                    at += len(g["params"])
                optimizers[name] = {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}
        return (modules, optimizers) if main else (None, None)

    def _load_sharded(self) -> tuple[dict, dict]:
        """``load_state`` under FSDP: every rank reads the file (full tensors, the single-process layout); rank 0's
        module tensors are broadcast into each rank's shards, the optimiser states are re-sharded."""
        t = self.task
        tensors, meta = read_state(self.path)

        def under(name):
            prefix = f"module.{name}."
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        full = {}
        for name, module in t.modules.items():
            saved = under(name)
            if isinstance(module, RoleState) or module is t.compensation:
                expected = set(module.named) if isinstance(module, RoleState) else set(module.state_dict())
                if set(saved) != expected:
                    raise ValueError(
                        f"{self.path}: the saved {name!r} state does not fit this network: missing "
                        f"{sorted(expected - set(saved))[:3]}, unexpected {sorted(set(saved) - expected)[:3]}"
                    )
                prefix = "base." if isinstance(module, RoleState) else "comp."
                full.update({prefix + k: v for k, v in saved.items()})
            else:
                module.load_state_dict(saved)
        P.load_full_state_dict(self._fsdp_modules, full if self.ranks.is_main else {}, self.ranks)
        names = {id(p): n for n, p in self._fsdp_modules.named_parameters()}
        for name, opt in t.optimizers.items():
            saved = optimizer_state_dict(name, tensors, meta)
            if not self._is_sharded(opt) or not saved["state"]:
                opt.load_state_dict(saved)
                continue
            order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
            groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
            state = {"state": {order[int(i)]: v for i, v in saved["state"].items()}, "param_groups": groups}
            P.load_full_optimizer_state(self._fsdp_modules, opt, state, self.ranks)
        return {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}, meta

    def resume(self) -> bool:
        if not os.path.exists(self.path):
            return False
        if self.sharded is not None:
            rng, meta = self._load_sharded()
        else:
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
        if not _all_finite(self.task.modules, self.ranks):
            return False
        rng = _gather_generator_states(self.gen, self.ranks)
        gathered = self._gathered() if self.sharded is not None else None
        if self.ranks.is_main:
            rng["torch"] = torch.get_rng_state()
            meta = {
                "iteration": self.iteration,
                "world": self.ranks.world,
                "stage": self.cfg.stage,
                "config": self.cfg.to_json(),
                "base_hash": self.base["hash"],
                "prompts_hash": self.base.get("prompts"),
                "cursor": json.dumps(self.task.cursor.state()),
            }
            if gathered is not None:
                modules, optimizers = gathered  # full states on the main rank (None only elsewhere)
                save_state_dicts(self.path, modules or {}, optimizers or {}, rng, meta)
            else:
                save_state(self.path, self.task.modules, self.task.optimizers, rng, meta)
        return True

    def sample(self, noise: torch.Tensor, cond) -> torch.Tensor:
        t = self.task
        with torch.no_grad():
            return run_student(t.student, noise.to(t.device), cond.to(t.device), t.sigmas, t.cache, t.compensation)

    def preview(self, write: bool = True) -> None:
        """A picture of what the student makes now: the teacher's own renderer (the demo's class grid) or
        the first latent channels of four samples. Under FSDP every rank samples (the model's calls are
        collectives) and only rank 0 writes (``write``)."""
        render = self.teacher.preview or latent_preview(self.teacher.prompts, self.teacher.flow.latent_shape)
        image = render(self.sample)
        if write:
            os.makedirs(os.path.join(self.cfg.run_dir, "previews"), exist_ok=True)
            # whole or not at all: the jobs panel and Load 1.x Student read the newest preview while the run goes on
            with atomic_path(
                os.path.join(self.cfg.run_dir, "previews", f"{self.iteration:05d}.png"), True, 0o644
            ) as tmp:
                image.save(tmp, format="PNG")

    def export(self) -> str | None:
        """Write the student file (rank 0). Under FSDP a collective: the base and the adapters are gathered to
        full tensors on rank 0 first and the LoRA merged there, so the file is the one a single process writes."""
        t, path = self.task, os.path.join(self.cfg.run_dir, STUDENT_FILE)
        net, compensation = t.student, t.compensation
        if self.sharded is not None:
            full = P.full_state_dict(self.sharded, self.ranks)
            if not self.ranks.is_main:
                return None
            base = {k[len("base.") :]: v for k, v in full.items() if k.startswith("base.")}
            net = _Merged(t.student, merged_weights(t.student.lora, t.student.adapter, base))
            if compensation is not None:
                with torch.random.fork_rng(devices=[]):  # a CPU copy, without moving rank 0's RNG
                    compensation = Compensation(t.student.width)
                compensation.load_state_dict({k[len("comp.") :]: v for k, v in full.items() if k.startswith("comp.")})
        save_student(
            path,
            net,
            t.sigmas,
            t.cfg.shift,
            t.cache,
            compensation,
            self.base,
            extra={"stage": self.cfg.stage, "iterations": self.iteration, "lora_rank": self.cfg.lora_rank},
            class_table=self.teacher.class_table,
        )
        return path


class _Merged:
    """The student role as ``save_student`` reads it, with merged weights gathered from FSDP shards."""

    def __init__(self, role, merged: dict):
        self.flow, self.module, self._merged = role.flow, role.module, merged

    def merged_state_dict(self) -> dict:
        return self._merged


def latent_preview(prompts: PromptSet, latent_shape: tuple):
    """For a model without a decoder here: four samples' first three latent channels side by side, as RGB."""

    def render(sample):
        noise = torch.randn((4, *latent_shape), generator=torch.Generator().manual_seed(1234))
        return latent_tiles(sample(noise, prompts.batch(torch.arange(4) % len(prompts))))

    return render


def latent_tiles(latents: torch.Tensor, rows: int = 1, scale: int = 8):
    """Samples' first three latent channels as RGB tiles (each sample stretched to its own range), ``rows`` rows of
    them: packed tokens [B, N, C] as a square grid of tokens, video [B, C, F, H, W] by its first frame."""
    from PIL import Image

    x = latents.float().cpu()
    if x.dim() == 3:  # packed tokens [B, N, C]: a square grid of tokens
        side = int(x.shape[1] ** 0.5)
        x = x[:, : side * side].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    if x.dim() == 5:  # video [B, C, F, H, W]: the first frame
        x = x[:, :, 0]
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    tiles = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).byte()
    per_row = math.ceil(len(tiles) / rows)
    lines = [torch.cat(list(tiles[i : i + per_row]), dim=2) for i in range(0, len(tiles), per_row)]
    width = max(line.shape[2] for line in lines)
    lines = [torch.nn.functional.pad(line, (0, width - line.shape[2])) for line in lines]
    img = Image.fromarray(torch.cat(lines, dim=1).permute(1, 2, 0).numpy())
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the step (weights and optimiser states stay fp32), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_training(
    cfg: RunConfig, progress: Callable[[dict], None] | None = None, stop=None, teacher: Teacher | None = None
) -> dict:
    """Train (or resume) one stage; returns {"status": done|stopped|failed, "iteration", "message", "student"}.
    ``teacher``: a base model the host loaded (``models.Teacher``); None loads ``cfg.teacher`` by its loader."""
    torch.set_num_threads(max(1, min(cfg.threads, torch.get_num_threads())))
    ranks = Ranks(pick_device(cfg.device), cfg.parallel, cfg.offload_optimizer)
    planned = check_memory(cfg, ranks) if teacher is None else None  # before anything is loaded (MemoryPlanRefused)
    if planned and ranks.is_main:
        log.info("[1.x-Distill] %s", planned)
    os.makedirs(cfg.run_dir, exist_ok=True)
    # one writer per run folder: a worker has opened (locked and checked) its own folder already
    opened = OpenRun.current(cfg.run_dir)
    with contextlib.nullcontext(opened) if opened is not None else OpenRun(cfg.run_dir, ranks.is_main) as run:
        teacher = load_run_teacher(cfg, teacher)
        doubled = double_guidance_warning(cfg, teacher.flow)
        if doubled and ranks.is_main:
            log.warning("[1.x-Distill] %s", doubled)
        name = teacher.base.get("name") or (
            os.path.basename(os.path.normpath(cfg.teacher)) if cfg.teacher else "the shipped demo teacher"
        )
        run.check(asdict(cfg), {"name": name, "hash": teacher.base["hash"], "prompts": teacher.base["prompts"]})
        return _train(cfg, ranks, progress, stop, teacher)


class Progress:
    """The iteration count for a person: a tqdm bar on a terminal; in a redirected log (no TTY, where a bar's
    carriage returns pile up) one plain log line at the run's first iteration, every tenth of the run, the last
    iteration, and at least every ``QUIET_S`` seconds in between (a long run's log never goes silent for hours)."""

    QUIET_S = 60.0

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, stream=None):
        stream = stream if stream is not None else sys.stderr  # where tqdm draws
        self.total, self.desc, self.enabled = total, desc, enabled
        self.every = max(1, math.ceil(total / 10))
        self.first, self.last_line = initial + 1, time.monotonic()
        isatty = getattr(stream, "isatty", None)
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, unit="it", file=stream)
            if enabled and isatty and isatty()
            else None
        )

    def update(self, record: dict) -> None:
        losses = {k: v for k, v in record.items() if k.startswith("loss")}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
            return
        it = record["iteration"]
        due = (
            it == self.first
            or it % self.every == 0
            or it == self.total
            or time.monotonic() - self.last_line >= self.QUIET_S
        )
        if not self.enabled or not due:
            return
        self.last_line = time.monotonic()
        text = ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
        speed, eta = record.get("it_per_s"), record.get("eta_s")
        pace = (
            f"{speed:.3g} it/s, ETA {_duration(eta)}" if speed is not None and eta is not None else "pace not known yet"
        )
        log.info(
            "[%s] iteration %d/%d (%d%%), %s%s",
            self.desc,
            it,
            self.total,
            100 * it // max(self.total, 1),
            pace,
            f", {text}" if text else "",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _train(cfg: RunConfig, ranks: Ranks, progress, stop, teacher: Teacher) -> dict:
    run = Run(cfg, ranks, teacher)
    resumed = run.resume()
    main = ranks.is_main
    if run.sharded is not None:
        placement = run.placement()
        if main:
            log.info("[1.x-Distill] %s", placement)
    if main and ranks.world > 1:  # DDP averages the roles' gradients (under FSDP: Stage II's discriminator heads)
        log.info("[1.x-Distill] %s", P.DDP_UNUSED_NOTE)
    bar = Progress(cfg.iterations, run.iteration, f"1.x-Distill {cfg.stage}", enabled=main)
    start, failures, status, message = time.time(), 0, "done", ""
    pace = Pace(cfg.iterations)  # from this run's first completed iteration: start-up and warm-up are not its pace
    if main and resumed:
        message = f"resumed from iteration {run.iteration}"
        log.info("[1.x-Distill] %s", message)  # in the log at once, not only in the final status
    while run.iteration < cfg.iterations:
        if _stop_requested(stop) or (cfg.max_minutes and time.time() - start > cfg.max_minutes * 60):
            status = "stopped"
            break
        with autocast(cfg.precision, ranks.device):
            metrics = run.task.step(run.iteration, cfg.batch_size, run.gen)
        run.iteration += 1
        finite = all(math.isfinite(v) for v in metrics.values())
        failures = 0 if finite else failures + 1
        now = time.time()
        speed, eta = pace.add(run.iteration, now)
        record = {
            "iteration": run.iteration,
            **metrics,
            "skipped": not finite,
            "it_per_s": speed,
            "eta_s": eta,
            "elapsed_s": now - start,
            "time": now,
        }
        if main:
            _log(os.path.join(cfg.run_dir, METRICS_FILE), record)
            bar.update(record)
        if progress is not None:
            progress(record)
        if failures >= cfg.max_nonfinite:
            status = "failed"
            message = (
                f"stopped at iteration {run.iteration}: {failures} consecutive non-finite losses or gradients; "
                f"the last good checkpoint ({run.path}) is kept, no checkpoint was written since"
            )
            break
        if finite and run.iteration % cfg.checkpoint_every == 0:
            run.checkpoint()
        if (
            (main or run.sharded is not None)
            and finite
            and cfg.preview_every
            and run.iteration % cfg.preview_every == 0
        ):
            run.preview(write=main)
    bar.close()
    student = None
    if status != "failed" and run.checkpoint():
        if main or run.sharded is not None:
            student = run.export()
    elif status != "failed":
        status, message = "failed", "the weights are not finite; nothing was written"
    if main and message:
        log.info("[1.x-Distill] %s", message)
    return {"status": status, "iteration": run.iteration, "message": message, "student": student}
