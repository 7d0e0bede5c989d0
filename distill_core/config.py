"""Run configuration: one JSON file per run (stage, budget, paths) with the stage's own settings nested."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from .stage1 import Stage1Config
from .stage2 import Stage2Config


# field -> smallest accepted value (0 iterations: export the starting point; preview_every 0: no previews)
MINIMUM = {"iterations": 0, "batch_size": 1, "checkpoint_every": 1, "preview_every": 0, "max_nonfinite": 1, "threads": 1}


def _check_run_fields(cfg) -> None:
    for name, low in MINIMUM.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"run config: {name} must be a whole number >= {low}, got {value!r} ({type(value).__name__}).")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ValueError(f"run config: seed must be a whole number, got {cfg.seed!r}.")
    if cfg.max_minutes is not None and not (isinstance(cfg.max_minutes, (int, float)) and not isinstance(cfg.max_minutes, bool) and cfg.max_minutes > 0):
        raise ValueError(f"run config: max_minutes must be a number > 0 or null (no limit), got {cfg.max_minutes!r}.")
    for name in ("run_dir",):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ValueError(f"run config: {name} must be a folder path, got {getattr(cfg, name)!r}.")


@dataclass
class RunConfig:
    run_dir: str
    stage: str = "stage1"  # "stage1" or "stage2"
    teacher: str | None = None  # the base model: a file or folder its loader reads (demo: None = the shipped teacher)
    teacher_loader: str = "xslim_lab.demo_model.distill:load_demo_teacher"  # "module:function" returning a models.Teacher
    teacher_options: dict = field(default_factory=dict)  # loader keyword arguments (e.g. latent_shape for diffusers)
    prompts: str | None = None  # a prompt-set file (conditioning.PromptSet); None: the loader's own (demo: its classes)
    lora_rank: int = 0  # 0: student and fake score are full copies; > 0: LoRA adapters on one shared frozen base
    lora_alpha: float | None = None  # LoRA scale numerator (None: = rank)
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: CUDA when present (cuda:LOCAL_RANK under torchrun)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimiser states stay fp32)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (nets.checkpoint_blocks)
    offload_optimizer: bool = False  # AdamW moments and fp32 master weights in CPU memory (updates.OffloadedAdamW)
    parallel: str = "ddp"  # under torchrun: "ddp" (each rank holds the whole base) or "fsdp" (FSDP2: the LoRA base sharded)
    memory_budget_gib: float | None = None  # memory per process the planner checks the run against (None: the GPU's own)
    init_student: str | None = None  # stage2: the Stage-I 2-step student file; stage1: optional starting student
    init_fake: str | None = None  # stage1: optional training state (state.safetensors) whose fake score to start from
    reference: str | None = None  # stage2: the 4-step Stage-I student that makes the reference images
    iterations: int = 400
    batch_size: int = 32  # per process
    seed: int = 0
    checkpoint_every: int = 50
    preview_every: int = 100
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    max_minutes: float | None = None  # stop (with a checkpoint) after this long
    threads: int = 2
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def __post_init__(self):
        _check_run_fields(self)
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"run config: lora_rank must be a whole number >= 1 for LoRA, or 0 for full copies; got {self.lora_rank!r}.")
        if not isinstance(self.teacher_loader, str) or ":" not in self.teacher_loader:
            raise ValueError(f"run config: teacher_loader must name 'package.module:function', got {self.teacher_loader!r}.")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"run config: precision must be 'fp32' or 'bf16', got {self.precision!r}.")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"run config: parallel must be 'ddp' or 'fsdp', got {self.parallel!r}.")
        if self.parallel == "fsdp" and self.lora_rank == 0:
            raise ValueError("run config: parallel 'fsdp' shards the one shared base of the LoRA layout; set lora_rank >= 1 "
                             "(full copies train with parallel 'ddp').")
        budget = self.memory_budget_gib
        if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0):
            raise ValueError(f"run config: memory_budget_gib must be a number > 0 or null (the GPU's own memory), got {budget!r}.")
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"stage must be 'stage1' or 'stage2', got {self.stage!r}")
        if isinstance(self.stage1, dict):
            self.stage1 = Stage1Config(**self.stage1)
        if isinstance(self.stage2, dict):
            s2 = dict(self.stage2)
            if "disc_blocks" in s2:
                s2["disc_blocks"] = tuple(s2["disc_blocks"])
            self.stage2 = Stage2Config(**s2)
        if self.stage == "stage2" and not (self.init_student and self.reference):
            raise ValueError("stage2 needs init_student (the Stage-I student) and reference (the 4-step Stage-I student)")

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run config keys: {unknown}")
        return cls(**data)

    @classmethod
    def load(cls, path: str, **overrides) -> "RunConfig":
        with open(path) as f:
            return cls.from_dict({**json.load(f), **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def prompts_path(self) -> str | None:
        """The prompt-set file; a relative ``prompts`` is the run folder's own (the ComfyUI node writes
        conditioning.safetensors there)."""
        if not self.prompts:
            return None
        return self.prompts if os.path.isabs(self.prompts) else os.path.join(self.run_dir, self.prompts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))
