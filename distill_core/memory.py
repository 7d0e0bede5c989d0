"""Memory planner for 1.x-Distill: predict the peak memory per GPU (per process on the CPU) of one DMD training iteration before anything
is loaded, pick settings that fit a budget, or refuse with the reason and the smallest change that would fit.

Pure Python arithmetic (torch is only needed by the benchmark); never imports ComfyUI.

What one iteration holds (docs/DISTILL.md, Stage I), and therefore what is counted:
- weights: full mode = frozen teacher + trainable student + trainable fake score (three copies, as distill_core
  does today); LoRA mode = one frozen base (the teacher is the base with adapters disabled) + two adapters;
- the two AdamW states (exp_avg, exp_avg_sq, fp32) of student and fake score, on the GPU or offloaded to CPU;
- the gradients of the net being updated (zero_grad(set_to_none=True) frees them between the two updates);
- activations: the student's forward with grad stays alive while the teacher runs its no-grad CFG forward
  (2B rows) and the fake score its no-grad forward, then the backward; the fake-score update is the same
  graph without the teacher;
- the compensation MLP (DeltaMLP, hidden 2x width, one per stream) with its AdamW state;
- on CUDA: a margin for the allocator's fragmentation, the CUDA context and the cuBLAS/NCCL workspaces.

The activation model counts what autograd saves per token, in units of the model width, per block. The
coefficients below were counted on the diffusers 0.42 blocks with ``saved_tensors_hooks`` (tiny instances of
width 20..128; they do not depend on the width because every saved tensor is [tokens, c x width]) and are
checked against measured peaks of whole emulated iterations by ``python -m xslim_lab.memory_bench``.
A frozen base saves less than a trainable one: autograd keeps a linear layer's input only when its weight
needs a gradient, and LoRA keeps it again for the adapter (plus [tokens, rank] per adapted layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from xslim_core.families import family_spec, trainable_families

GIB = 1024**3
MIB = 1024**2
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Under bf16/fp16 autocast norms/softmax statistics stay fp32 and linear inputs are saved in the low dtype:
# about 20% of the saved elements are fp32 (not measured here: the CPU benchmark runs fp32).
AUTOCAST_ACT_FACTOR = 1.2
MODES = ("full", "lora")
SHARDINGS = ("none", "ddp", "fsdp")


def size(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB up, MiB below, KiB below 1 MiB, three significant digits (never "0.0 GiB")."""
    if n == 0:
        return "0 B"
    for unit, name in ((GIB, "GiB"), (MIB, "MiB")):
        if n >= unit:
            return f"{n / unit:.3g} {name}"
    return f"{n / 1024:.3g} KiB"


def budget_text(gib: float) -> str:
    """A budget in GiB as given: one decimal (24.0, 22.4), or three significant digits when smaller than 0.1."""
    return f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib:.3g} GiB"


def per(device: str) -> str:
    """What a figure is counted for: each GPU on CUDA, each process on the CPU."""
    return "per GPU" if device == "cuda" else "per process"


@dataclass(frozen=True)
class Family:
    """Per-family token geometry and saved-activation coefficients (elements per token per width per block)."""

    name: str
    latent_downscale: int  # VAE spatial downscale
    patch: int  # spatial patch size on the latent
    # saved activations per token per width, (full, lora); "outside" = embeddings + final layer. The family's record
    # holds them (xslim_core.families ActivationModel); no default here, so there is one place to read them.
    double: tuple
    single: tuple
    outside: tuple
    temporal_downscale: int = 1  # video VAEs: latent frames = (frames - 1) // t + 1
    patch_t: int = 1
    text_tokens: int = 0  # the pipeline's default text length (all encoders concatenated)
    mlp_targets_double: int = 6  # LoRA-adapted linears per stream of a double block (q, k, v, out, ff1, ff2)
    mlp_targets_single: int = 5  # q, k, v, proj_mlp, proj_out
    dual_extra: tuple = (0.0, 0.0)  # a second, image-only attention per block (SD3.5-M), per image token


def _planner_family(spec) -> Family:
    """The planner's view of a registered family (``xslim_core.families``: geometry and coefficients live there)."""
    return Family(
        spec.id,
        spec.latent.downscale,
        spec.latent.patch,
        temporal_downscale=spec.latent.temporal_downscale,
        text_tokens=spec.text_tokens,
        double=spec.activations.double,
        single=spec.activations.single,
        outside=spec.activations.outside,
        dual_extra=spec.activations.dual_extra,
    )


FAMILIES = {spec.id: _planner_family(spec) for spec in trainable_families()}
FAMILIES.update(
    {alias: replace(FAMILIES[spec.id], name=alias) for spec in trainable_families() for alias in spec.aliases}
)
FAMILIES["demo"] = replace(FAMILIES["hunyuan_video"], name="demo", latent_downscale=4, patch=1, text_tokens=4)


@dataclass(frozen=True)
class Architecture:
    """The shape facts the planner needs; ``params`` is the whole transformer's parameter count."""

    family: str
    width: int
    heads: int
    double_blocks: int
    single_blocks: int = 0
    dual_attention_blocks: int = 0
    mlp_ratio: float = 4.0
    params: int = 0  # 0: estimated from the shapes
    note: str = ""

    def estimated_params(self) -> int:
        d, m = self.width, self.mlp_ratio
        # per stream: q,k,v,out 4d^2 + FF 2md^2 + adaLN 6d^2 (biases and norms are negligible)
        double = 2 * (4 + 2 * m + 6) * d * d
        single = (3 + 3 + 2 * m) * d * d  # qkv + adaLN(3) + proj_mlp + proj_out (d+md -> d)
        return int(self.double_blocks * double + self.single_blocks * single + self.dual_attention_blocks * 4 * d * d)

    @property
    def total_params(self) -> int:
        return self.params or self.estimated_params()

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    def lora_params(self, rank: int) -> int:
        """LoRA on the attention and MLP linears of every block (the reference recipe: all blocks)."""
        d, m = self.width, self.mlp_ratio
        double = 2 * (4 * 2 * d + 2 * (d + m * d))  # per stream: q,k,v,out + ff1 + ff2
        single = 3 * 2 * d + (d + m * d) + (d + m * d + d)  # q,k,v + proj_mlp + proj_out
        per_rank = self.double_blocks * double + self.single_blocks * single + self.dual_attention_blocks * 8 * d
        return int(rank * per_rank)


# Published architectures (diffusers configs; sources in docs/MEMORY.md).
MODELS = {
    "sd3.5-medium": Architecture(
        "sd3.5",
        1536,
        24,
        24,
        dual_attention_blocks=13,
        params=2_470_000_000,
        note="24 joint blocks (13 with dual attention), 24x64 heads",
    ),
    "sd3.5-large": Architecture("sd3.5", 2432, 38, 38, params=8_060_000_000, note="38 joint blocks, 38x64 heads"),
    "flux.1-dev": Architecture(
        "flux", 3072, 24, 19, 38, params=11_900_000_000, note="19 double + 38 single blocks, 24x128 heads"
    ),
    "hunyuan-video": Architecture(
        "hunyuan_video", 3072, 24, 20, 40, params=12_820_000_000, note="20 double + 40 single blocks, 24x128 heads"
    ),
    "demo": Architecture("demo", 128, 1, 4, 8, params=5_102_864, note="the shipped demo teacher"),
}


@dataclass(frozen=True)
class Setup:
    """One training configuration. ``resolution`` is (height, width) in pixels (latent pixels x downscale)."""

    arch: Architecture
    resolution: tuple = (1024, 1024)
    frames: int = 1
    batch: int = 1  # per GPU
    dtype: str = "bf16"  # base weights and compute (autocast); trainable weights and AdamW stay fp32
    mode: str = "full"
    lora_rank: int = 64
    checkpointing: bool = False
    offload_optimizer: bool = False
    gpus: int = 1
    sharding: str = "none"
    cfg: bool = True  # the teacher runs cond + uncond rows
    compensation_streams: int = 2
    text_tokens: int | None = None
    device: str = "cuda"  # "cpu": no CUDA context / fragmentation margin

    def validate(self) -> None:
        a = self.arch
        if a.family not in FAMILIES:
            raise ValueError(f"unknown family {a.family!r}; supported: {', '.join(sorted(FAMILIES))}")
        for name, v in (
            ("width", a.width),
            ("heads", a.heads),
            ("batch", self.batch),
            ("frames", self.frames),
            ("gpus", self.gpus),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if a.double_blocks < 0 or a.single_blocks < 0 or a.blocks == 0:
            raise ValueError("the architecture needs at least one block (double_blocks + single_blocks > 0)")
        if a.params < 0:
            raise ValueError(f"params must be positive (or 0 to estimate from the shapes), got {a.params}")
        if len(self.resolution) != 2 or any(not isinstance(v, int) or v <= 0 for v in self.resolution):
            raise ValueError(f"resolution must be two positive integers (height, width), got {self.resolution!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'full' or 'lora', got {self.mode!r}")
        if self.mode == "lora" and (not isinstance(self.lora_rank, int) or self.lora_rank <= 0):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.lora_rank!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if self.sharding != "none" and self.gpus == 1:
            raise ValueError(f"sharding {self.sharding!r} needs gpus > 1")
        if self.text_tokens is not None and self.text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0, got {self.text_tokens}")

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch.family]

    def tokens(self) -> tuple[int, int]:
        """(image tokens, text tokens) per sample."""
        f = self.family
        h, w = (math.ceil(v / f.latent_downscale / f.patch) for v in self.resolution)
        t = math.ceil(((self.frames - 1) // f.temporal_downscale + 1) / f.patch_t)
        txt = f.text_tokens if self.text_tokens is None else self.text_tokens
        return h * w * t, txt


@dataclass
class Prediction:
    setup: Setup
    parts: dict  # bytes per GPU at the peak, by component
    phase: str  # the phase where the peak happens
    peak: int  # bytes the tensors occupy at the peak (compare with torch.cuda.max_memory_allocated)
    reserved: int  # peak + allocator/context margin (what must fit the budget)
    cpu_bytes: int  # host memory for offloaded optimizer states

    def summary(self) -> str:
        s = self.setup
        opts = [s.mode if s.mode == "full" else f"LoRA r{s.lora_rank}", s.dtype, f"batch {s.batch}"]
        opts += ["checkpointing"] * s.checkpointing
        opts += [f"AdamW states on CPU ({size(self.cpu_bytes)} host RAM)"] * s.offload_optimizer
        if s.gpus > 1:
            opts.append(f"{s.sharding.upper() if s.sharding != 'none' else 'no sharding'} x{s.gpus}")
        return f"{', '.join(opts)}: {size(self.reserved)} {per(s.device)} (tensors {size(self.peak)}, peak in {self.phase})"

    def parts_text(self) -> str:
        """The parts at the peak, largest first: "frozen weights 22.2 GiB, activations + gradients 3.1 GiB"."""
        return ", ".join(f"{k} {size(v)}" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]))


def _activation_elems(s: Setup, rows: int, grad: bool) -> dict:
    """Elements autograd saves (grad) or the largest live temporaries (no grad) for ``rows`` samples."""
    a, f = s.arch, s.family
    t_img, t_txt = s.tokens()
    t_all, d = t_img + t_txt, a.width
    k = 0 if s.mode == "full" else 1
    if not grad:
        # a no-grad forward holds the residual streams plus one block's temporaries (FF hidden in and out)
        return {"nograd": rows * t_all * d * (2 + 3 * a.mlp_ratio)}
    r = s.lora_rank if s.mode == "lora" else 0
    lora = r * (
        f.mlp_targets_double * t_all * a.double_blocks
        + f.mlp_targets_single * t_all * a.single_blocks
        + 4 * t_img * a.dual_attention_blocks
    )
    per_block = [f.double[k] * t_all * d] * a.double_blocks + [f.single[k] * t_all * d] * a.single_blocks
    dual = f.dual_extra[k] * t_img * d * a.dual_attention_blocks
    outside = f.outside[k] * t_all * d
    # backward of one block: incoming gradient, the gradient it produces and the FF-hidden gradients
    backward = t_all * d * (2 + 2 * a.mlp_ratio)
    if s.checkpointing:
        # only each block's inputs are kept (both streams + modulation); one block is recomputed at a time
        saved = 1.1 * t_all * d * a.blocks + max(per_block) + (dual + lora) / max(a.blocks, 1) + outside
    else:
        saved = sum(per_block) + dual + lora + outside
    return {"saved": rows * saved, "backward": rows * backward}


def predict(s: Setup) -> Prediction:
    """Peak memory per GPU of one Stage-I iteration (fake-score update, student update, two AdamW steps)."""
    s.validate()
    a = s.arch
    p = a.total_params
    wb = DTYPE_BYTES[s.dtype]
    ab = 4 if s.dtype == "fp32" else 2 * AUTOCAST_ACT_FACTOR
    shard = s.gpus if s.sharding == "fsdp" else 1
    comp = s.compensation_streams * (4 * a.width**2 + 7 * a.width)  # DeltaMLP: LN + d->2d->d
    if s.mode == "full":
        frozen = p * wb  # the teacher
        trainable_one = p  # student and fake score are full copies, fp32 master weights
        trainable_all = 2 * p
    else:
        frozen = p * wb  # the one shared base
        trainable_one = a.lora_params(s.lora_rank)
        trainable_all = 2 * trainable_one
    trainable_all += comp
    parts = {
        "frozen weights": frozen / shard,
        "trainable weights": 4 * trainable_all / shard,
        "optimizer states": 0 if s.offload_optimizer else 8 * trainable_all / shard,
    }
    grads = 4 * (trainable_one + comp) / shard
    if s.sharding == "ddp":
        grads *= 2  # DDP's gradient buckets are a second copy unless gradient_as_bucket_view
    if s.dtype != "fp32" and s.mode == "full" and s.sharding != "fsdp":
        parts["autocast weight copies"] = wb * trainable_one  # autocast caches the low-precision weights
    if s.sharding == "fsdp":
        # all-gathered blocks: the current and the prefetched one, plus one block's unsharded gradients
        block = p / a.blocks * 1.5
        parts["fsdp gather buffers"] = 2 * block * wb + (4 * block if s.mode == "full" else 0)
    act = _activation_elems(s, s.batch, grad=True)
    teacher_rows = 2 * s.batch if s.cfg else s.batch
    nograd = _activation_elems(s, teacher_rows, grad=False)["nograd"]
    # AdamW's foreach path (the default on CUDA) works on a temporary the size of the parameters it steps
    # (sqrt of exp_avg_sq); on CPU it steps one tensor at a time, so the temporaries are negligible
    adam_tmp = 0 if s.offload_optimizer or s.device == "cpu" else 4 * (trainable_one + comp) / shard
    phases = {
        "student forward (teacher CFG)": ab * (act["saved"] + nograd),
        "student backward": ab * (act["saved"] + act["backward"]) + grads,
        "optimizer step": grads + adam_tmp,
    }
    phase = max(phases, key=lambda name: phases[name])
    parts["activations + gradients" if phase != "optimizer step" else "gradients + AdamW temporaries"] = phases[phase]
    parts = {k: int(v) for k, v in parts.items()}
    peak = int(sum(parts.values()))
    # CUDA: allocator fragmentation (~10%), the context and cuBLAS/NCCL workspaces (~0.75 GiB)
    reserved = peak if s.device == "cpu" else int(peak * 1.10 + 0.75 * GIB)
    cpu = int(12 * trainable_all / shard) if s.offload_optimizer else 0  # states + fp32 grad copies on the host
    return Prediction(s, parts, phase, peak, reserved, cpu)


@dataclass
class Plan:
    fits: bool
    prediction: Prediction  # the chosen setup, or the smallest one tried when nothing fits
    message: str
    tried: list = field(default_factory=list)


def _candidates(s: Setup, allow_lora: bool, lora_rank: int, allow_offload: bool = True):
    """Settings in the order they cost least: speed first (checkpointing), then sharding, then the method
    (LoRA changes what is trained), then host round-trips (optimizer offload), then the batch."""
    multi = s.gpus > 1
    base = replace(s, sharding="ddp" if multi else "none")
    modes = [s.mode] + (["lora"] if allow_lora and s.mode == "full" else [])
    batches = [s.batch]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    for batch in batches:
        for mode in modes:
            rank = lora_rank if mode == "lora" and s.mode == "full" else s.lora_rank
            for offload in (False, True) if allow_offload else (s.offload_optimizer,):
                for ckpt in (False, True):
                    for sharding in ["ddp", "fsdp"] if multi else ["none"]:
                        yield replace(
                            base,
                            batch=batch,
                            mode=mode,
                            lora_rank=rank,
                            offload_optimizer=offload,
                            checkpointing=ckpt or s.checkpointing,
                            sharding=sharding,
                        )


def plan(s: Setup, budget_gib: float, allow_lora: bool = True, lora_rank: int = 64, allow_offload: bool = True) -> Plan:
    """Pick the cheapest settings whose predicted reserved memory fits ``budget_gib`` per GPU, or refuse.
    ``allow_offload=False``: never propose AdamW states on the CPU (a trainer that cannot do it)."""
    s.validate()
    if not budget_gib > 0:
        raise ValueError(f"the memory budget must be positive, got {budget_gib!r} GiB")
    if allow_lora and (not isinstance(lora_rank, int) or lora_rank <= 0):
        raise ValueError(f"LoRA rank must be a positive integer, got {lora_rank!r}")
    budget = budget_gib * GIB
    tried = []
    for c in _candidates(s, allow_lora, lora_rank, allow_offload):
        pred = predict(c)
        tried.append(pred)
        if pred.reserved <= budget:
            return Plan(True, pred, f"fits in {budget_text(budget_gib)}: {pred.summary()}", tried)
    smallest = min(tried, key=lambda q: q.reserved)
    return Plan(False, smallest, _refusal(smallest, budget_gib), tried)


def _refusal(best: Prediction, budget_gib: float) -> str:
    """Why nothing fits, and the smallest single change that would (more GPUs, less resolution, more memory)."""
    s = best.setup
    msg = (
        f"does not fit {budget_text(budget_gib)} {per(s.device)}: the smallest setting ({best.summary()}) needs "
        f"{size(best.reserved)} [{best.parts_text()}]."
    )
    changes = []
    for n in (2, 4, 8, 16, 32, 64):  # FSDP over more GPUs shards the weights and states
        if n > s.gpus and predict(replace(s, gpus=n, sharding="fsdp")).reserved <= budget_gib * GIB:
            changes.append(f"FSDP over {n} GPUs")
            break
    h, w = s.resolution
    step = s.family.latent_downscale * s.family.patch
    for scale in [x / 16 for x in range(15, 3, -1)]:  # the largest smaller resolution (or frame count) that fits
        r = (max(step, int(h * scale) // step * step), max(step, int(w * scale) // step * step))
        if predict(replace(s, resolution=r)).reserved <= budget_gib * GIB:
            changes.append(f"resolution {r[0]}x{r[1]}")
            break
    if s.frames > 1:
        t = s.family.temporal_downscale
        for frames in range(s.frames - t, 0, -t):
            if predict(replace(s, frames=frames)).reserved <= budget_gib * GIB:
                changes.append(f"{frames} frames")
                break
    if not changes and s.gpus == 1:  # no single change: FSDP (weights) together with a lower resolution (activations)
        for n in (2, 4, 8):
            for scale in [x / 16 for x in range(15, 3, -1)]:
                r = (max(step, int(h * scale) // step * step), max(step, int(w * scale) // step * step))
                if predict(replace(s, gpus=n, sharding="fsdp", resolution=r)).reserved <= budget_gib * GIB:
                    changes.append(f"FSDP over {n} GPUs and resolution {r[0]}x{r[1]}")
                    break
            if len(changes):
                break
    changes.append(more_memory(best))
    return (
        msg
        + " Smallest change that fits: "
        + changes[0]
        + (f" (or: {'; '.join(changes[1:])})" if len(changes) > 1 else "")
        + "."
    )


def more_memory(p: Prediction) -> str:
    """The change "more memory", worded for where the run is: a GPU of a size GPUs come in, else the budget to set."""
    if p.setup.device != "cuda":
        return f"{size(p.reserved)} of memory per process (raise the memory budget)"
    if p.reserved < 8 * GIB:  # smaller than any GPU one would buy for training: the budget is what limits
        return f"{size(p.reserved)} of GPU memory (raise the memory budget)"
    return f"a GPU with {math.ceil(p.reserved / GIB)} GiB"


REFERENCE = {name: spec.reference_model for spec in trainable_families() for name in (spec.id, *spec.aliases)}
REFERENCE["demo"] = "demo"


def setup_from_params(family: str, params: int, **kw) -> Setup:
    """A Setup from a parameter count alone: the family's reference architecture (width, block mix) with its
    depth scaled to ``params`` - the activations are then an estimate from that shape."""
    if family not in REFERENCE:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(sorted(REFERENCE))}")
    if not isinstance(params, int) or params <= 0:
        raise ValueError(f"params must be a positive integer, got {params!r}")
    reference = REFERENCE[family]
    if reference is None:
        raise ValueError(f"family {family!r} names no published architecture to scale from")
    ref = MODELS[reference]
    scale = params / ref.total_params
    arch = replace(
        ref,
        family=family,
        double_blocks=max(1, round(ref.double_blocks * scale)),
        single_blocks=round(ref.single_blocks * scale),
        dual_attention_blocks=0,
        params=params,
        note=f"{ref.note}, depth scaled x{scale:.2f} to {params / 1e9:.2f}B parameters",
    )
    return Setup(arch=arch, **kw)


def model_setup(name: str, **kw) -> Setup:
    """A Setup for a published architecture in MODELS (e.g. 'flux.1-dev')."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return Setup(arch=MODELS[name], **kw)


def as_dict(p: Prediction) -> dict:
    d = asdict(p.setup)
    d.update(parts=p.parts, phase=p.phase, peak=p.peak, reserved=p.reserved, cpu_bytes=p.cpu_bytes)
    return d


# -- a run's setup, read before anything is loaded -------------------------------------------------------------
# diffusers transformer classes -> planner family
CLASS_FAMILIES = {name: spec.id for spec in trainable_families() for name in spec.model_classes}
SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def safetensors_shapes(path: str, limit: int = 64 << 20) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's JSON header alone (no tensor is read)."""
    from .jobfiles import safetensors_entries

    entries, _ = safetensors_entries(path, limit)
    return {k: (str(v.get("dtype")), list(v.get("shape", []))) for k, v in entries.items()}


def weights_params(path: str) -> tuple[int, str]:
    """(parameter count, dominant safetensors dtype) of a weights file or a diffusers folder's safetensors files,
    from their headers."""
    import os

    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    )
    if not files:
        raise ValueError(f"{path} holds no .safetensors weights to plan from.")
    count, by_dtype = 0, {}  # type: tuple[int, dict[str, int]]
    for f in files:
        for dtype, shape in safetensors_shapes(f).values():
            n = math.prod(shape)
            count += n
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    return count, max(by_dtype, key=lambda dtype: by_dtype[dtype])


def diffusers_run_setup(
    path: str, latent_shape, extra: dict | None = None, text_tokens: int | None = None, **kw
) -> Setup:
    """The planner's Setup for a diffusers transformer folder (config.json + safetensors) trained on latents of
    ``latent_shape`` (one sample, as the run's ``teacher_options``): the architecture from its config, the
    parameter count from the safetensors headers, and a resolution giving exactly the model's image tokens.
    Nothing is loaded. ``kw``: the Setup's other fields (batch, mode, lora_rank, checkpointing, dtype, ...)."""
    import json
    import os

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    family = CLASS_FAMILIES.get(str(config.get("_class_name")))
    if family is None:
        raise ValueError(
            f"{path}: the planner knows no family for {config.get('_class_name')!r} "
            f"(it knows {', '.join(CLASS_FAMILIES)})."
        )
    params, _ = weights_params(path)
    dual = config.get("dual_attention_layers") or ()
    arch = Architecture(
        family,
        int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
        int(config["num_attention_heads"]),
        int(config.get("num_layers", 0)),
        int(config.get("num_single_layers", 0) or 0),
        len(dual),
        float(config.get("mlp_ratio", 4.0)),
        params,
        note=os.path.basename(os.path.normpath(path)),
    )
    fam, shape, extra = FAMILIES[family], list(latent_shape), dict(extra or {})
    patch = int(config.get("patch_size", 1) or 1)
    frames = 1
    latent = family_spec(family).latent
    assert latent is not None, f"{family} is a trainable family: it has a latent geometry"
    if latent.packed:  # tokens [N, C] on a grid of (h, w) tokens
        grid = extra.get("grid") or [math.isqrt(shape[0]), math.ceil(shape[0] / max(1, math.isqrt(shape[0])))]
        th, tw = int(grid[0]), int(grid[1])
    elif latent.video:  # [C, F, H, W]
        th, tw = math.ceil(shape[2] / patch), math.ceil(shape[3] / patch)
        frames = (math.ceil(shape[1] / int(config.get("patch_size_t", 1) or 1)) - 1) * fam.temporal_downscale + 1
    else:  # [C, H, W]
        th, tw = math.ceil(shape[1] / patch), math.ceil(shape[2] / patch)
    step = fam.latent_downscale * fam.patch  # the family's pixels per token: the planner's own token count
    return Setup(arch=arch, resolution=(th * step, tw * step), frames=frames, text_tokens=text_tokens, **kw)
