"""A 1.x-step student inside ComfyUI: checked against the base model, applied as weight patches, sampled
through the X-Slim host.

* The student file is checked from its header first (``distill_core.student.read_header``): family, block
  stacks, cached range and tensor shapes against the loaded base model, then the base's identity (its weights
  signature), all before a single student tensor is read.
* Its weights go onto a ``clone()`` as ComfyUI "diff" weight patches (student - base), so patches added
  before (a LoRA) still apply and the base model object is never modified.
* Its cached step is the X-Slim engine's segment mode, installed by ``host.install`` (the same wrappers and
  ``patches_replace["dit"]`` the cache node uses): one block-cache mechanism for both halves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

from distill_core.cache import Compensation
from distill_core.identity import signature_id, signature_mismatch, weights_signature
from distill_core.student_file import StudentHeader, read_header
from xslim_core import XSlimConfig
from xslim_demo.teacher import key_rules, swap_halves
from xslim_core.state import RunStats
from .families import family_for, supported_families
from .host import KEY, XSlimSettings, XSlimSetupError, install, malloc_graph_pause

STUDENTS = "students"  # the model folder the pack registers (models/students), plus the shipped demo students
SHIPPED_STUDENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distill_core", "weights")
BASE_CHECKS = ["strict", "trust (same weights, other precision)"]
PREFIX = "diffusion_model."
log = logging.getLogger("xslim")


def register_students_folder() -> None:
    """``models/students`` (where the training node exports) and the shipped demo students; safetensors only."""
    import folder_paths

    if STUDENTS not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(STUDENTS, os.path.join(folder_paths.models_dir, STUDENTS), is_default=True)
    folder_paths.add_model_folder_path(STUDENTS, SHIPPED_STUDENTS)
    paths, _ = folder_paths.folder_names_and_paths[STUDENTS]
    folder_paths.folder_names_and_paths[STUDENTS] = (paths, {".safetensors"})


def student_names() -> list[str]:
    import folder_paths

    register_students_folder()
    return folder_paths.get_filename_list(STUDENTS)


@dataclass
class StudentSettings(XSlimSettings):
    """X-Slim settings in segment mode, plus what the student file declares (the sampler nodes read it)."""

    header: StudentHeader | None = None
    name: str = ""
    role = "a 1.x student"

    def engine_for(self, diffusion_model, sigmas: list[float] | None = None, *args, **kwargs):
        # ComfyUI's guider runs the host's run wrapper (which builds the engine here) before the sampler function,
        # so one sigma from SamplerCustomAdvanced is refused here, with the fix, rather than by the engine's check
        if sigmas is not None and len(sigmas) < 2:
            raise too_few_sigmas(len(sigmas))
        return super().engine_for(diffusion_model, sigmas, *args, **kwargs)

    def summary(self, stats: RunStats) -> str:
        cache = self.header.cache if self.header else None
        cached = f"blocks {cache.first}..{cache.last} cached" if cache else "no cached blocks"
        return f"1.x student: {stats.num_steps} steps, {cached} - effective NFE {stats.effective_nfe:.2f}"


def too_few_sigmas(count: int) -> XSlimSetupError:
    # empty sigmas never reach a sampler: ComfyUI's guider returns the latent as it is
    return XSlimSetupError(f"1.x student: got {count} sigma(s), so there is no step to take (the output would be the noise). "
                           "Connect 1.x Student Sigmas to the sampler's sigmas input.")


def student_settings(model) -> StudentSettings:
    settings = model.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(settings, StudentSettings):
        raise XSlimSetupError("This model has no 1.x student. Connect the MODEL output of the Load 1.x Student node.")
    return settings


class CompensationCall:
    """The engine's segment transform: the student's compensation MLPs, run in fp32 on the deltas' device."""

    def __init__(self, module: Compensation):
        self.module = module.eval().requires_grad_(False)
        self.width = module.img.norm.normalized_shape[0]

    def __call__(self, img: torch.Tensor, txt: torch.Tensor | None):
        if img.shape[-1] != self.width:
            raise XSlimSetupError(f"1.x student: its compensation is {self.width} wide, the model's blocks are {img.shape[-1]} wide.")
        if next(self.module.parameters()).device != img.device:  # kept beyond this block: outside the malloc graph
            with (malloc_graph_pause() or contextlib.nullcontext)():
                self.module.to(img.device)
        with torch.no_grad():
            out_img = self.module.img(img.float()).to(img.dtype)
            out_txt = None if txt is None else self.module.txt(txt.float()).to(txt.dtype)
        return out_img, out_txt


# -- checks, from the header alone ---------------------------------------------------------------------------
def base_weights(model_patcher) -> dict[str, torch.Tensor]:
    """The base model's own weights (names without the prefix), before any weight patch: a model that is
    loaded with patches applied keeps its originals in the patcher's backup, which get_key_patches returns."""
    if hasattr(model_patcher, "get_key_patches"):
        return {k[len(PREFIX):]: v[0][0] for k, v in model_patcher.get_key_patches(PREFIX).items()}
    return {k[len(PREFIX):]: v for k, v in model_patcher.model_state_dict(PREFIX).items()}


def comfy_layout(header: StudentHeader) -> dict[str, tuple[tuple[str, ...], bool]]:
    """ComfyUI key -> (the student's tensor names concatenated into it, swap halves). Diffusers-named
    HunyuanVideo students (the demo's) go through the demo teacher's rule table."""
    names = [k for k in header.shapes if k.startswith("model.")]
    if header.model_keys == "comfy":
        return {k[len("model."):]: ((k,), False) for k in names}
    if header.model_keys == "diffusers" and header.meta.get("base_family") == "hunyuan_video":
        counts = dict(header.stacks or [])
        refiners = 1 + max((int(k.split(".")[4]) for k in names if ".token_refiner.refiner_blocks." in k), default=-1)
        layout = {}
        for comfy, parts, suffixes, swap in key_rules(refiners, counts.get("double", 0), counts.get("single", 0)):
            for ds, cs in suffixes:
                layout[f"{comfy}.{cs}"] = (tuple(f"model.{p}.{ds}" for p in parts), swap)
        return layout
    raise XSlimSetupError(
        f"1.x student {header.path}: its weights use {header.model_keys!r} names for a {header.meta.get('base_family')!r} "
        "model, which this loader cannot map to ComfyUI's names. Export the student with ComfyUI key names (model_keys=comfy)."
    )


def host_key_names(model_patcher, names) -> dict[str, str]:
    """File key name -> the name this ComfyUI gives it, by the model config's own file conversion
    (``process_unet_state_dict``): ComfyUI 0.28 renames RMSNorm ``scale`` to ``weight`` when it loads a file, so a
    student written with the older names (the shipped ones) follows whatever the host does to the base's file."""
    convert = getattr(getattr(model_patcher.model, "model_config", None), "process_unet_state_dict", None)
    if convert is None:
        return {n: n for n in names}
    try:  # the names ride as values: a conversion that only renames (every DiT family's) maps them through
        converted = convert({n: n for n in names})
    except (TypeError, AttributeError):  # a conversion that computes on tensors: names taken as they are
        return {n: n for n in names}
    renamed = {original: new for new, original in converted.items() if isinstance(original, str)}
    return {n: renamed.get(n, n) for n in names}


def check_against_base(header: StudentHeader, model_patcher, base_check: str) -> tuple[dict, dict]:
    """Refuse a student that does not fit this base model, naming both; returns (layout, base weights)."""
    where = f"1.x student {os.path.basename(header.path)}"
    dm = model_patcher.get_model_object("diffusion_model")
    family = family_for(dm)
    if family is None:
        raise XSlimSetupError(f"{where}: the base model is a {type(dm).__name__}; students run on {supported_families()}.")
    declared = header.meta.get("base_family")
    if declared != family.family:
        raise XSlimSetupError(f"{where} was distilled from a {declared!r} model; the model connected here is {family.display_name} ({family.family!r}). Connect its own base model.")
    stacks = [tuple(s) for s in family.stack_sizes(dm)]
    if header.stacks is not None and [tuple(s) for s in header.stacks] != stacks:
        raise XSlimSetupError(f"{where} declares block stacks {header.stacks}; the model connected here has {stacks}. It was distilled from another architecture.")
    if header.cache is not None:
        try:
            header.cache.check(sum(n for _, n in stacks))
        except ValueError as e:
            raise XSlimSetupError(f"{where}: {e}.") from None
    width = getattr(dm, "hidden_size", None)
    comp_width = header.shapes.get("comp.img.norm.weight", (None,))[0]
    if header.cache is not None and isinstance(width, int) and comp_width not in (None, width):
        raise XSlimSetupError(f"{where}: its compensation module is {comp_width} wide, this model's blocks are {width} wide.")
    base = base_weights(model_patcher)
    file_layout = comfy_layout(header)
    names = host_key_names(model_patcher, list(file_layout))
    layout = {names[k]: v for k, v in file_layout.items()}
    wanted = {p for parts, _ in layout.values() for p in parts}
    missing = sorted(wanted - set(header.shapes))
    unexpected = sorted({k for k in header.shapes if k.startswith("model.")} - wanted)
    foreign = sorted(set(layout) - set(base))
    uncovered = sorted(k for k, t in base.items() if t.is_floating_point() and k not in layout)
    if missing or uncovered:
        names = (missing or uncovered)[:3]
        raise XSlimSetupError(f"{where} is missing {len(missing) or len(uncovered)} weight tensor(s) of this model, e.g. {names}; the file is incomplete or for another architecture.")
    if unexpected or foreign:
        raise XSlimSetupError(f"{where} holds {len(unexpected) or len(foreign)} tensor(s) this model does not have, e.g. {(unexpected or foreign)[:3]}.")
    for key, (parts, _) in layout.items():
        shape = (sum(header.shapes[p][0] for p in parts), *header.shapes[parts[0]][1:])
        if shape != tuple(base[key].shape):
            raise XSlimSetupError(f"{where}: tensor {key} is {list(shape)} in the student, {list(base[key].shape)} in this model: another architecture.")
    if base_check == BASE_CHECKS[0]:  # the signature was taken under the file's names
        file_names = {host: file for file, host in names.items()}
        check_identity(where, header, {file_names.get(k, k): t for k, t in base.items()})
    return layout, base


def check_identity(where: str, header: StudentHeader, base: dict) -> None:
    expected = header.signature
    if not expected:
        raise XSlimSetupError(f"{where} carries no signature of its base model, so it cannot be checked; set base_check to "
                              f"'{BASE_CHECKS[1]}' if you know this is its base.")
    found = weights_signature(base)
    reason = signature_mismatch(expected, found)
    if reason:
        raise XSlimSetupError(
            f"{where} was distilled from base {header.meta.get('base_family')} {header.meta.get('base_hash', '?')} "
            f"({signature_id(expected)}); the model connected here is {signature_id(found)}: {reason}. A student only works "
            f"with the weights it was distilled from. If this model is the same weights quantised or converted, set base_check to '{BASE_CHECKS[1]}'."
        )


# -- applying it -------------------------------------------------------------------------------------------
def weight_patches(header: StudentHeader, layout: dict, base: dict, buffers: set) -> dict:
    """ComfyUI "diff" patches (student - base) for every tensor the student changed, in fp32 for fp32 bases.
    Buffers (e.g. SD3's fixed position table) cannot take weight patches; a student may not change them."""
    patches = {}
    with safe_open(header.path, framework="pt") as f:
        for key, (parts, swap) in layout.items():
            weight = torch.cat([f.get_tensor(p) for p in parts], dim=0)
            if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):  # would sample NaN without a word
                raise XSlimSetupError(f"1.x student {os.path.basename(header.path)}: tensor {parts[0]} holds NaN or infinite "
                                      "values; the file is damaged. Export the student again.")
            weight = swap_halves(weight) if swap else weight
            original = base[key]
            diff = weight.float() - original.detach().float().cpu()
            if not diff.any():
                continue
            if key in buffers:
                raise XSlimSetupError(f"1.x student {os.path.basename(header.path)} changes {key}, a fixed buffer of the model "
                                      "(not a trained weight), which ComfyUI's weight patches cannot change. Export the student again without it.")
            patches[PREFIX + key] = (diff.to(original.dtype),)
    return patches


def compensation(header: StudentHeader) -> Compensation | None:
    if header.cache is None:
        return None
    names = {k[len("comp."):]: k for k in header.shapes if k.startswith("comp.")}
    width = header.shapes.get("comp.img.norm.weight", (0,))[0]
    module = Compensation(width)
    expected = module.state_dict()
    if set(names) != set(expected):
        raise XSlimSetupError(f"1.x student {os.path.basename(header.path)}: its compensation tensors are incomplete ({len(names)} of "
                              f"{len(expected)}); the file is damaged or was cut short. Export the student again.")
    for k, t in expected.items():
        if tuple(header.shapes[names[k]]) != tuple(t.shape):
            raise XSlimSetupError(f"1.x student {header.path}: compensation tensor {k} has shape {header.shapes[names[k]]}, expected {list(t.shape)}.")
    with safe_open(header.path, framework="pt") as f:
        module.load_state_dict({k: f.get_tensor(n).float() for k, n in names.items()})
    return module


def load_student_model(model_patcher, path: str, base_check: str = BASE_CHECKS[0]):
    """The base model with the student's weights and its cached step; the input model is untouched."""
    if base_check not in BASE_CHECKS:
        raise XSlimSetupError(f"Load 1.x Student: base_check must be one of {BASE_CHECKS}, got {base_check!r}.")
    if isinstance(model_patcher.model_options.get("transformer_options", {}).get(KEY), XSlimSettings):
        raise XSlimSetupError("Load 1.x Student: this model already went through an X-Slim or student node. Connect the base model from its loader (and LoRA nodes) directly.")
    try:
        header = read_header(path)
    except (ValueError, FileNotFoundError) as e:
        raise XSlimSetupError(f"Load 1.x Student: {e}") from None
    layout, base = check_against_base(header, model_patcher, base_check)
    # the compensation (a few small tensors) is checked and read before weight_patches reads every model tensor:
    # an incomplete file is refused without the large read
    comp = compensation(header)
    patched = model_patcher.clone()
    buffers = {name for name, _ in model_patcher.get_model_object("diffusion_model").named_buffers()}
    patched.add_patches(weight_patches(header, layout, base, buffers), 1.0)
    if header.cache is not None:
        config = XSlimConfig(mode="segment", segment=(header.cache.first, header.cache.last), levels=frozenset({"block"}))
    else:
        config = XSlimConfig(mode="off")
    settings = StudentSettings(config, segment_transform=CompensationCall(comp) if comp is not None else None,
                               header=header, name=os.path.basename(path))
    return install(patched, settings), header
