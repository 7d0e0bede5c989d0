"""Run configuration: one JSON file per run (stage, budget, paths) with the stage's own settings nested."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from .flow import GRID_SIZE
from .stage1 import Stage1Config
from .stage2 import Stage2Config


# field -> smallest accepted value (0 iterations: export the starting point; preview_every 0: no previews)
MINIMUM = {
    "iterations": 0,
    "batch_size": 1,
    "checkpoint_every": 1,
    "preview_every": 0,
    "max_nonfinite": 1,
    "threads": 1,
}


def _check_run_fields(cfg) -> None:
    for name, low in MINIMUM.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(
                f"run config: {name} must be a whole number >= {low}, got {value!r} ({type(value).__name__})."
            )
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ValueError(f"run config: seed must be a whole number, got {cfg.seed!r}.")
    if cfg.max_minutes is not None and not (
        isinstance(cfg.max_minutes, (int, float)) and not isinstance(cfg.max_minutes, bool) and cfg.max_minutes > 0
    ):
        raise ValueError(f"run config: max_minutes must be a number > 0 or null (no limit), got {cfg.max_minutes!r}.")
    for name in ("run_dir",):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise ValueError(f"run config: {name} must be a folder path, got {getattr(cfg, name)!r}.")
    _check_rules(cfg, RUN_RULES)


def _check_rules(obj, rules: dict, prefix: str = "") -> None:
    """Each ``rules`` entry (field -> (what is accepted, test)) on ``obj``, refused naming ``prefix + field``."""
    for key, (accepted, ok) in rules.items():
        value = getattr(obj, key)
        if not ok(value):
            raise ValueError(
                f"run config: {prefix}{key} must be {accepted}, got {value!r:.80} ({type(value).__name__})."
            )


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _device(v) -> bool:
    if v is None or v in ("", "auto"):
        return True
    try:
        return isinstance(v, str) and torch.device(v).type != "meta"
    except (RuntimeError, TypeError):
        return False


def _optional_path(v) -> bool:
    return v is None or (isinstance(v, str) and v != "")


# RunConfig fields beyond the counts above: accepted (said in the message) and the test
RUN_RULES = {
    "device": ("null/'auto' or a torch device name such as 'cpu', 'cuda' or 'cuda:1'", _device),
    "teacher_options": ("a dict of the loader's keyword arguments", lambda v: isinstance(v, dict)),
    "lora_alpha": ("a number > 0 or null (= lora_rank)", lambda v: v is None or (_number(v) and v > 0)),
    "gradient_checkpointing": ("true or false", lambda v: isinstance(v, bool)),
    "offload_optimizer": ("true or false", lambda v: isinstance(v, bool)),
    "prompts": ("null or a prompt-set file path", _optional_path),
    "teacher": ("null or the base model's path", _optional_path),
    "init_student": ("null or a student file path", _optional_path),
    "init_fake": ("null or a training state file path", _optional_path),
    "reference": ("null or a student file path", _optional_path),
}

# Stage settings, per field: what is accepted (said in the message) and the test. The cached block range is
# checked as a pair (both null, or 0 <= cache_first <= cache_last); every other field has a rule here.
POSITIVE = ("a finite number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = ("a finite number >= 0", lambda v: _number(v) and v >= 0)
BETA = ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
COMMON_RULES = {
    "steps": (f"a whole number of student steps in 1..{GRID_SIZE}", lambda v: _whole(v) and 1 <= v <= GRID_SIZE),
    "shift": POSITIVE,
    "lr_student": POSITIVE,
    "lr_comp": POSITIVE,
    "beta1": BETA,
    "beta2": BETA,
    "weight_decay": NON_NEGATIVE,
}
STAGE1_RULES = {
    **COMMON_RULES,
    "guidance_scale": NON_NEGATIVE,
    "guidance_switch": (
        "a finite number >= 0 (CFG where sigma <= it; >= 1: everywhere)",
        lambda v: _number(v) and v >= 0,
    ),
    "importance_sampling": ("true or false", lambda v: isinstance(v, bool)),
    "lr_fake": POSITIVE,
    "fake_updates": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "clip_student": POSITIVE,
    "clip_fake": POSITIVE,
    "huber_c": POSITIVE,
    "regression_weight": NON_NEGATIVE,
    "regression_pairs": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "regression_steps": ("a whole number of teacher steps in 1..1000", lambda v: _whole(v) and 1 <= v <= 1000),
    "regression_batch": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "classes": (
        "null (all) or a non-empty list of class indices >= 0",
        lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_whole(c) and c >= 0 for c in v)),
    ),
}
STAGE2_RULES = {
    **COMMON_RULES,
    "lr_disc": POSITIVE,
    "clip": POSITIVE,
    "disc_warmup": ("a whole number of iterations >= 0", lambda v: _whole(v) and v >= 0),
    "comp_warmup": ("a whole number of iterations >= 0", lambda v: _whole(v) and v >= 0),
    "g_every": ("a whole number >= 1", lambda v: _whole(v) and v >= 1),
    "real_label": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "disc_blocks": (
        "a non-empty list of block indices >= 0",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_whole(b) and b >= 0 for b in v),
    ),
    "disc_sigma_max": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "output_weight": NON_NEGATIVE,
}
CACHE_FIELDS = ("cache_first", "cache_last")


def stage_settings(name: str, value, cls, rules: dict):
    """``value`` (a dict from JSON or a ``cls``) as a checked ``cls``: unknown keys, wrong types and values out of
    range are refused naming ``name.field``, the value and what is accepted."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"run config: unknown {name} setting(s) {unknown}; {name} takes {sorted(f.name for f in fields(cls))}."
            )
        value = cls(**value)
    if not isinstance(value, cls):
        raise ValueError(
            f"run config: {name} must be a dict of {name} settings, got {value!r:.80} ({type(value).__name__})."
        )
    _check_rules(value, rules, f"{name}.")
    _check_cache_pair(name, value.cache_first, value.cache_last)
    return value


def _check_cache_pair(name: str, first, last) -> None:
    if first is None and last is None:
        return
    if not (_whole(first) and _whole(last) and 0 <= first <= last):
        raise ValueError(
            f"run config: {name}.cache_first and {name}.cache_last must both be null (no cached blocks) or "
            f"block indices with 0 <= cache_first <= cache_last; got {first!r} and {last!r}."
        )


@dataclass
class RunConfig:
    run_dir: str
    stage: str = "stage1"  # "stage1" or "stage2"
    teacher: str | None = None  # the base model: a file or folder its loader reads (demo: None = the shipped teacher)
    teacher_loader: str = "xslim_demo.distill:load_demo_teacher"  # "module:function" returning a models.Teacher
    teacher_options: dict = field(default_factory=dict)  # loader keyword arguments (e.g. latent_shape for diffusers)
    prompts: str | None = None  # a prompt-set file (conditioning.PromptSet); None: the loader's own (demo: its classes)
    lora_rank: int = 0  # 0: student and fake score are full copies; > 0: LoRA adapters on one shared frozen base
    lora_alpha: float | None = None  # LoRA scale numerator (None: = rank)
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: CUDA when present (cuda:LOCAL_RANK under torchrun)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimiser states stay fp32)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (nets.checkpoint_blocks)
    offload_optimizer: bool = False  # AdamW moments and fp32 master weights in CPU memory (updates.OffloadedAdamW)
    parallel: str = (
        "ddp"  # under torchrun: "ddp" (each rank holds the whole base) or "fsdp" (FSDP2: the LoRA base sharded)
    )
    memory_budget_gib: float | None = (
        None  # memory per process the planner checks the run against (None: the GPU's own)
    )
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
            raise ValueError(
                f"run config: lora_rank must be a whole number >= 1 for LoRA, or 0 for full copies; got {self.lora_rank!r}."
            )
        if not isinstance(self.teacher_loader, str) or ":" not in self.teacher_loader:
            raise ValueError(
                f"run config: teacher_loader must name 'package.module:function', got {self.teacher_loader!r}."
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"run config: precision must be 'fp32' or 'bf16', got {self.precision!r}.")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"run config: parallel must be 'ddp' or 'fsdp', got {self.parallel!r}.")
        if self.parallel == "fsdp" and self.lora_rank == 0:
            raise ValueError(
                "run config: parallel 'fsdp' shards the one shared base of the LoRA layout; set lora_rank >= 1 "
                "(full copies train with parallel 'ddp')."
            )
        budget = self.memory_budget_gib
        if budget is not None and not (
            isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0
        ):
            raise ValueError(
                f"run config: memory_budget_gib must be a number > 0 or null (the GPU's own memory), got {budget!r}."
            )
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"stage must be 'stage1' or 'stage2', got {self.stage!r}")
        self.stage1 = stage_settings("stage1", self.stage1, Stage1Config, STAGE1_RULES)
        if isinstance(self.stage2, dict) and isinstance(self.stage2.get("disc_blocks"), list):
            self.stage2 = {**self.stage2, "disc_blocks": tuple(self.stage2["disc_blocks"])}
        self.stage2 = stage_settings("stage2", self.stage2, Stage2Config, STAGE2_RULES)
        if self.stage == "stage2" and not (self.init_student and self.reference):
            raise ValueError(
                "stage2 needs init_student (the Stage-I student) and reference (the 4-step Stage-I student)"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"run config: unknown key(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def load(cls, path: str, **overrides) -> "RunConfig":
        """A run config file, with command-line ``overrides`` (None: keep the file's); every refusal names the file."""
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except (ValueError, RecursionError) as err:  # JSONDecodeError, undecodable bytes, absurd nesting
            raise ValueError(f"run config {path} is not valid JSON ({err}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"run config {path} must hold one JSON object of settings, got {type(data).__name__}.")
        try:
            return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def prompts_path(self) -> str | None:
        """The prompt-set file; a relative ``prompts`` is the run folder's own (the ComfyUI node writes
        conditioning.safetensors there)."""
        if not self.prompts:
            return None
        return self.prompts if os.path.isabs(self.prompts) else os.path.join(self.run_dir, self.prompts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class RunRequest:
    """A run's settings as a submitter gives them (the ComfyUI Train node, the job manager): checked at once as a
    ``RunConfig`` (unknown keys, wrong types and values out of range are refused naming the setting, before a run
    folder exists) and kept as given. job.json records exactly these keys (the worker fills in RunConfig's defaults
    and the run folder), so a resume compares the same keys as the start did."""

    settings: dict

    def __post_init__(self):
        if not isinstance(self.settings, dict):
            raise ValueError(f"run config: the settings must be a dict, got {type(self.settings).__name__}.")
        RunConfig.from_dict({**self.settings, "run_dir": self.settings.get("run_dir") or "."})

    def to_json(self) -> dict:
        return json.loads(json.dumps(self.settings))  # a copy: nested dicts included
