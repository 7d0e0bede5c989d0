"""ComfyUI's own DiT classes behind 1.x-Distill's model protocol (``distill_core.models.FlowModel``).

``distill_core`` never imports ComfyUI: this host layer supplies what it needs for ComfyUI's classes - the
velocity call (ComfyUI's flow models predict noise - x0, as diffusers' do; only the time scale and argument
names differ), the block specs the cached step patches (the same ``BlockSpec`` the X-Slim engine binds by
signature; MMDiT's joint blocks take positional ``(context, x)`` and get a small positional spec), LoRA
targets under ComfyUI's layer names, and the student file's key convention ("comfy"), so a student trained
here loads through *Load 1.x Student* with no key mapping. The family table is ``families.py``'s.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from distill_core.conditioning import Conditioning
from distill_core.models import FlowModel
from xslim_core.adapters.base import BlockSpec
from xslim_core.families import family_spec, model_times, trainable_families
from xslim_core.hooks import wrap_forward
from xslim_core.tokens import join_sequence, split_sequence
from .families import FAMILY_BY_ID, family_for, supported_families



class PositionalCall:
    """One call of an MMDiT joint block: ``block(context, x, c=..., ...)`` returning ``(context, x)``."""

    def __init__(self, spec: "PositionalBlockSpec", args, kwargs):
        self.spec, self.args, self.kwargs = spec, list(args), dict(kwargs)

    @property
    def img(self) -> torch.Tensor:
        return self.args[1]

    @property
    def txt(self) -> torch.Tensor:
        return self.args[0]

    def call(self, forward):
        txt, img = forward(*self.args, **self.kwargs)
        return img, txt

    def pack(self, img, txt):
        return txt, img


class PositionalBlockSpec:
    outputs = ("txt", "img")

    def __init__(self, index: int, stack: str, module: torch.nn.Module):
        self.index, self.stack, self.module = index, stack, module

    def bind(self, args, kwargs) -> PositionalCall:
        return PositionalCall(self, args, kwargs)


class SingleStreamCall:
    """One call of a FLUX/HunyuanVideo single-stream block, ``block(x, vec=..., pe=...)`` with x = text and image
    tokens in one sequence: seen as two streams, split as ComfyUI's X-Slim engine splits them (``families``),
    so the compensation a student learns here is applied the same way when it samples in ComfyUI."""

    def __init__(self, spec: "SingleStreamSpec", args, kwargs):
        self.spec, self.args, self.kwargs = spec, list(args), dict(kwargs)
        n_txt = spec.root.__dict__.get("_distill_text_tokens")
        if n_txt is None:
            raise RuntimeError("a single-stream block was called outside a 1.x-Distill velocity call")
        self.n_txt = n_txt
        self.txt, self.img = split_sequence(self.x, spec.layout, n_txt, dim=1)

    @property
    def x(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["x"]

    def call(self, forward):
        out = forward(*self.args, **self.kwargs)
        txt, img = split_sequence(out, self.spec.layout, self.n_txt, dim=1)
        return img, txt

    def pack(self, img, txt):
        return join_sequence(txt, img, self.spec.layout, dim=1)


class SingleStreamSpec:
    outputs = ("img",)

    def __init__(self, index: int, stack: str, module: torch.nn.Module, root: torch.nn.Module, layout: str):
        self.index, self.stack, self.module, self.root, self.layout = index, stack, module, root, layout

    def bind(self, args, kwargs) -> SingleStreamCall:
        return SingleStreamCall(self, args, kwargs)


def comfy_blocks(diffusion_model) -> list:
    """Block specs of a ComfyUI diffusion model, in execution order (the family table's stacks)."""
    family = _family(diffusion_model)
    single_layout, _ = family.layouts(diffusion_model)
    specs = []
    for stack, attr, kind in family.comfy_stacks:
        for block in getattr(diffusion_model, attr):
            if family.positional_blocks:
                specs.append(PositionalBlockSpec(len(specs), stack, block))
            elif kind == "single_block":  # [txt; img] (or [img; txt]) in one sequence named x
                specs.append(SingleStreamSpec(len(specs), stack, block, diffusion_model, single_layout))
            else:
                specs.append(BlockSpec(len(specs), stack, block, "img", "txt", ("img", "txt"), []))
    return specs


def _family(diffusion_model):
    family = family_for(diffusion_model)
    trainable = {spec.id for spec in trainable_families()}
    if family is None or family.family not in trainable:
        raise TypeError(f"1.x-Distill cannot train ComfyUI's {type(diffusion_model).__name__} yet; it trains "
                        f"{', '.join(sorted(trainable))} (X-Slim caches {supported_families()}).")
    return family


@contextmanager
def _out_of_place_blocks(module):
    """ComfyUI's blocks (some versions) add residuals in place (``x += ...``) after a norm has saved ``x`` for
    backward, which autograd refuses. While gradients are on, every tensor a block saves for backward that
    shares storage with one of its stream inputs is saved as a copy (``saved_tensors_hooks``); nothing else is
    copied and the blocks' code runs unchanged."""
    def guarded(inner, *args, **kwargs):
        streams = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in streams else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return inner(*args, **kwargs)

    undo = [wrap_forward(spec.module, guarded) for spec in comfy_blocks(module)]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


@contextmanager
def _comfy_training_kernels():
    """ComfyUI's own switch to differentiable kernels, ``comfy.model_management.in_training`` (its train node sets
    it): ComfyUI 0.28 otherwise applies RoPE with comfy-kitchen's fused op, which has no backward. Feature-detected;
    restored after the call. The Train node's worker is a process of its own, so no sampling shares the switch."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


def comfy_velocity(module, x: torch.Tensor, sigma, cond: Conditioning, extra: dict) -> torch.Tensor:
    family = extra["family"]
    spec = family_spec(family)
    # ComfyUI's model_sampling multiplier for these families is the diffusers pipelines' timestep scale
    t = model_times(sigma, x, spec.time_scale)
    kwargs = {"y": cond.pooled}
    if spec.embedded_guidance is not None and getattr(module.params, "guidance_embed", False):
        kwargs["guidance"] = torch.full_like(t, extra.get("guidance", spec.embedded_guidance))
    if FAMILY_BY_ID[family].text_mask_input and cond.mask is not None and not bool(cond.mask.all()):
        kwargs["attention_mask"] = cond.mask.long()
    module.__dict__["_distill_text_tokens"] = cond.context.shape[1]  # where single-stream blocks split their sequence
    if not torch.is_grad_enabled():
        return module(x, t, context=cond.context, **kwargs)
    with _out_of_place_blocks(module), _comfy_training_kernels():
        return module(x, t, context=cond.context, **kwargs)


class ComfyFlowModel(FlowModel):
    """A ComfyUI diffusion model (``model.model.diffusion_model`` of a MODEL) as a 1.x-Distill flow model."""

    model_keys = "comfy"

    def __init__(self, module: torch.nn.Module, latent_shape: tuple, extra: dict | None = None):
        family = _family(module).family
        super().__init__(module, latent_shape, {**(extra or {}), "family": family}, blocks=comfy_blocks, call=comfy_velocity,
                         family=family)

    @property
    def lora_targets(self) -> str:
        return _family(self.module).lora_targets

    @property
    def width(self) -> int:
        return int(self.module.hidden_size)

    @property
    def text_dims(self) -> tuple[int | None, int | None]:
        return _family(self.module).text_dims(self.module)

    def stack_sizes(self) -> list[tuple[str, int]]:
        return _family(self.module).stack_sizes(self.module)

    def with_module(self, module: torch.nn.Module) -> "ComfyFlowModel":
        return ComfyFlowModel(module, self.latent_shape, {k: v for k, v in self.extra.items() if k != "family"})


def load_comfy_student(path: str, template: torch.nn.Module, latent_shape: tuple, extra: dict | None = None,
                       base_hash: str | None = None):
    """A student file with ComfyUI key names on a copy of ``template`` (the base's diffusion model), as
    ``distill_core.student.Student``: what a host-trained Stage II starts from and compares against."""
    import copy

    from distill_core.cache import Compensation
    from distill_core.student import Student, _check_keys, _read, read_header

    header = read_header(path)
    if header.model_keys != "comfy":
        raise ValueError(f"{path} holds {header.model_keys!r} weights; this base is one of ComfyUI's own classes.")
    if base_hash is not None and header.meta.get("base_hash") != base_hash:
        raise ValueError(f"{path} was distilled from base model {header.meta.get('base_hash')}; this base is {base_hash}.")
    tensors, _ = _read(path)
    module = _without_adapters(copy.deepcopy(template)).eval().requires_grad_(False)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_keys(path, "model", set(module.state_dict()), set(weights))
    module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in weights.items()})
    flow = ComfyFlowModel(module, latent_shape, extra)
    compensation = None
    if header.cache is not None:
        compensation = Compensation(flow.width)
        compensation.load_state_dict({k[len("comp."):]: v.float() for k, v in tensors.items() if k.startswith("comp.")})
        compensation.eval().requires_grad_(False)
    return Student(flow, header.sigmas, header.cache, compensation, header.meta)


def comfy_teacher(diffusion_model: torch.nn.Module, latent_shape: tuple, prompts, base: dict, extra: dict | None = None):
    """A ``distill_core.models.Teacher`` for one of ComfyUI's diffusion models: its velocity, blocks, LoRA
    targets and key names, and a student loader for its Stage II."""
    from functools import partial

    from distill_core.models import Teacher

    flow = ComfyFlowModel(diffusion_model, latent_shape, extra)
    loader = partial(_load_for, template=diffusion_model, latent_shape=latent_shape, extra=extra)
    return Teacher(flow, prompts, {**base, "family": flow.family}, student_loader=loader)


def _load_for(path: str, base_hash: str | None = None, *, template, latent_shape, extra):
    return load_comfy_student(path, template, latent_shape, extra, base_hash)


def _without_adapters(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with any peft LoRA layer replaced by the layer it wraps (a LoRA run's base, copied)."""
    for name, child in list(module.named_modules()):
        base = getattr(child, "base_layer", None)
        if base is not None and hasattr(child, "lora_A"):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        module.__dict__.pop(attr, None)
    return module


# -- the background worker's side: a ComfyUI model file, loaded by ComfyUI's own loader ------------------------


def latent_shape_for(family: str, width: int, height: int, frames: int = 1) -> tuple:
    """The diffusion model's input shape for one sample at ``width`` x ``height`` pixels (and ``frames``)."""
    spec = family_spec(family)
    latent = spec.latent
    channels, down, time_down = latent.channels, latent.downscale, latent.temporal_downscale
    if width % (down * 2) or height % (down * 2):
        raise ValueError(f"width and height must be multiples of {down * 2} for {family}, got {width}x{height}.")
    if latent.video:
        if (frames - 1) % time_down:
            raise ValueError(f"{spec.display_name} takes {time_down}k+1 frames "
                             f"(1, {time_down + 1}, {2 * time_down + 1}, ...), got {frames}.")
        return (channels, (frames - 1) // time_down + 1, height // down, width // down)
    return (channels, height // down, width // down)


def load_comfy_file_teacher(path: str, latent_shape: list, extra: dict | None = None, name: str | None = None,
                            dtype: str = "fp32"):
    """``RunConfig.teacher_loader`` for a ComfyUI diffusion-model file (run in the worker process, which the job
    manager starts with ComfyUI importable): ComfyUI's loader detects the class. ``dtype`` of the frozen base:
    "fp32", or "bf16" on a GPU (with bf16 autocast; peft keeps the LoRA adapters in fp32)."""
    import os

    import comfy.cli_args

    if not torch.cuda.is_available():  # a CPU worker (no GPU visible to it): ComfyUI must not look for a driver
        comfy.cli_args.args.cpu = True
    import comfy.sd

    from distill_core.jobfiles import content_hash
    from distill_core.identity import weights_signature

    patcher = comfy.sd.load_diffusion_model(path)
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}.")
    module = patcher.model.diffusion_model
    # the signature Load 1.x Student compares against: the diffusion model's own weights as ComfyUI loaded them
    # (its key names, whatever prefix the file used), taken before the cast
    signature = weights_signature(module.state_dict())
    module.to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    base = {"hash": content_hash(path), "name": name or os.path.basename(path), "signature": signature}
    return comfy_teacher(module, tuple(latent_shape), None, base, extra)
