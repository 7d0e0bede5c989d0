"""1.x-Distill inside ComfyUI: *1.x-Distill Train* starts a background job and returns at once with its handle;
*1.x-Distill Job Status* turns a job into IMAGEs (loss plot, latest preview) and the finished student's name.

The training itself runs in a worker process (``nodes/jobs.py``, ``distill_core/worker.py``); these nodes only
validate, write the run folder and read it back. Model files are names from ComfyUI's ``diffusion_models``
folders (never paths), and only safetensors headers are read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from comfy_api.latest import io

from distill_core import jobfiles as jf
from xslim_core.families import trainable_families
from xslim_demo.text_teacher import LATENT_SHAPE as TEXT_LATENT_SHAPE

from .distill_host import latent_shape_for
from .families import FAMILIES as COMFY_FAMILIES
from .families import family_of_file
from .jobs import ACTIVE, JobError, check_run_name, manager, parse_devices

CATEGORY = "X-Slim/1.x-Distill"
GPU_SHARING = ["exclusive", "shared", "separate device"]
DEMO_FORMAT = "xslim-demo-teacher/1"
DEMO = "demo"
TEXT_DEMO_FORMAT = "xslim-demo-text-teacher/1"
ALL_CLASSES = "all classes"
log = logging.getLogger("xslim")
# the families the worker trains, as the Train node names them (ComfyUI's families that have a trainer record)
FAMILY_NAMES = {f.family: f.short_name for f in COMFY_FAMILIES if f.family in {s.id for s in trainable_families()}}
NAME_RULE_TIP = "letters, digits, '.', '_' and '-'"
AUTO = "auto"
# Safe starting points where a widget is left at auto (cached_blocks 'auto', batch_size 0, guidance_scale 0): each
# family's record (xslim_core.families), the demo's own here; a value set by hand is used as it is, so saved
# workflows train exactly as before. Why these values: docs/decisions/0004-trainer-defaults.md.
FAMILY_DEFAULTS = {
    DEMO: {"batch_size": 8, "guidance_scale": 2.0},
    **{spec.id: {"batch_size": spec.trainer.batch_size, "guidance_scale": spec.trainer.guidance_scale}
       for spec in trainable_families() if spec.trainer is not None},
}
PACK = __name__.rsplit(".", 2)[0]  # the package name ComfyUI loaded this pack under (the worker registers it again)
PACK_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _comfy_root() -> str:
    # from a module file: `comfy` itself is a namespace package in ComfyUI (no __init__.py, so no __file__)
    import comfy.model_management

    return os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))


# -- what the chosen model file is ---------------------------------------------------------------------------
def _guess_family(keys: list[str]) -> str:
    family = family_of_file(keys)
    return family.short_name if family is not None else "unrecognised"


def probe_model(name: str, path: str) -> dict:
    """The family of a diffusion-model file from its safetensors header; refuses what the worker cannot train."""
    if not name.lower().endswith((".safetensors", ".sft")):
        raise JobError(f"1.x-Distill Train: {name} is not a safetensors file; only safetensors are read (a pickled "
                       ".ckpt/.pt file could run code when loaded). Convert it to safetensors first.")
    try:
        keys, meta = jf.safetensors_header(path)
    except ValueError as err:
        raise JobError(f"1.x-Distill Train: {err}.") from None
    if meta.get("format") == TEXT_DEMO_FORMAT:
        return _probe_text_demo(name, path, meta)
    if meta.get("format") == DEMO_FORMAT:
        from xslim_demo.teacher import classes_path

        classes = classes_path(path)  # next to the file, or the shipped table for a link to the shipped teacher
        if not os.path.isfile(classes):
            raise JobError(f"1.x-Distill Train: {name} is a demo-teacher file but its class table "
                           f"{os.path.basename(classes)} is missing next to it.")
        try:
            arch = json.loads(meta.get("architecture", "{}"))
            blocks = int(arch["num_layers"]) + int(arch["num_single_layers"])
        except (ValueError, KeyError, TypeError):
            raise JobError(f"1.x-Distill Train: {name} declares no readable architecture in its metadata.") from None
        return {"family": DEMO, "blocks": blocks, "classes_path": classes, "class_names": json.loads(meta.get("classes", "[]"))}
    family = _guess_family(keys)
    trainable = {name: family for family, name in FAMILY_NAMES.items()}
    if family in trainable:
        return {"family": trainable[family], "blocks": _count_blocks(keys), "classes_path": None, "class_names": []}
    what = "a model this trainer does not recognise" if family == "unrecognised" else f"a {family} model"
    raise JobError(
        f"1.x-Distill Train: {name} is {what}. The background trainer distils SD3/SD3.5, FLUX and HunyuanVideo "
        "diffusion-model files (and the demo teacher). Nothing was started.")


def _count_blocks(keys: list[str]) -> int:
    """Blocks of a ComfyUI-format DiT file, from its tensor names (the stacks the cached range counts through)."""
    import re

    found = {m.group(1, 2) for k in keys for m in [re.search(r"(double_blocks|single_blocks|joint_blocks)\.(\d+)\.", k)] if m}
    return len(found)


def _probe_text_demo(name: str, path: str, meta: dict) -> dict:
    """The text demo teacher (SD3-shaped): trainable like any SD3 file, its prompts encoded by its own text encoder
    beside it (no CLIP input needed), its latent fixed at 16 x 8 x 8 (64 x 64 pixels in ComfyUI's SD3 terms)."""
    from xslim_demo.text_teacher import encoder_path

    encoder = encoder_path(path)
    if not os.path.isfile(encoder):
        raise JobError(f"1.x-Distill Train: {name} is the text demo teacher but its text encoder "
                       f"{os.path.basename(encoder)} is missing next to it. Nothing was started.")
    try:
        blocks = int(json.loads(meta.get("architecture", "{}"))["num_layers"])
    except (ValueError, KeyError, TypeError):
        raise JobError(f"1.x-Distill Train: {name} declares no readable architecture in its metadata.") from None
    return {"family": "sd3", "blocks": blocks, "classes_path": None, "class_names": [], "text_encoder": encoder,
            "text_teacher": path}


def _demo_text_conditioning_writer(teacher_path: str, prompts: list[str]):
    """The prompt list encoded once by the text demo teacher's own encoder, written like a CLIP-encoded one."""
    def write(run_dir: str) -> None:
        from xslim_demo.distill import text_prompt_set
        from xslim_demo.text_teacher import TextTeacher, load_text_encoder

        module, vocab = load_text_encoder(teacher_path)
        text_prompt_set(TextTeacher(None, module, vocab, {}), prompts).save(os.path.join(run_dir, jf.CONDITIONING))
    return write


def encode_prompts(clip, prompts: list[str], negative: str = ""):
    """The prompt list through ComfyUI's CLIP (tokenize + encode_from_tokens, its public calls), padded to one
    length with a mask, as a ``distill_core`` PromptSet; ``negative`` is the unconditional prompt."""
    import torch

    from distill_core.conditioning import Conditioning, encode_prompt_set

    def encode(texts):
        rows = []
        for text in texts:
            context, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            rows.append((context[0].float().cpu(), None if pooled is None else pooled[0].float().cpu()))
        length = max(c.shape[0] for c, _ in rows)
        context = torch.zeros(len(rows), length, rows[0][0].shape[-1])
        mask = torch.zeros(len(rows), length)
        for i, (c, _) in enumerate(rows):
            context[i, : c.shape[0]], mask[i, : c.shape[0]] = c, 1
        pooled = None if rows[0][1] is None else torch.stack([p for _, p in rows])
        return Conditioning(context, pooled, mask)

    return encode_prompt_set(prompts, encode, negative)


def _text_conditioning_writer(clip, prompts: list[str]):
    def write(run_dir: str) -> None:
        encode_prompts(clip, prompts).save(os.path.join(run_dir, jf.CONDITIONING))
    return write


def prompt_identities(clip, lines: list[str]) -> dict:
    """What a text job's conditioning depends on, without encoding anything: the prompt list and the text encoder.
    Recorded in job.json's ``base``; a resume that changes either is refused, naming the prompts."""
    return {"prompt_list": hashlib.sha256(json.dumps(lines).encode()).hexdigest()[:16], "text_encoder": clip_identity(clip)}


def clip_identity(clip) -> str:
    """What decides how ``clip`` encodes, cheaply (no encoding, no full read of its weights): the name, dtype, shape
    and first elements of every weight, the patches on it (LoRA: strengths and a sample of their tensors), the
    layer it stops at and its tokenizer options. ``get_key_patches`` (public on ComfyUI's CLIP) gives the unpatched
    weights, so the answer is the same whether the CLIP is loaded on the GPU or not."""
    h = hashlib.sha256(type(clip).__name__.encode())
    key_patches = getattr(clip, "get_key_patches", None)
    patches = key_patches() if callable(key_patches) else {}
    for key in sorted(patches):
        h.update(key.encode())
        _digest(h, patches[key])
    for attr in ("layer_idx", "tokenizer_options"):
        h.update(repr(getattr(clip, attr, None)).encode())
    return h.hexdigest()[:16]


def _digest(h, value, depth: int = 0) -> None:
    import torch

    if torch.is_tensor(value):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        try:
            h.update(value.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
        except (RuntimeError, TypeError, NotImplementedError):  # a quantised tensor type: its dtype and shape only
            pass
    elif isinstance(value, (str, int, float, bool, type(None))):
        h.update(repr(value).encode())
    elif depth < 4 and isinstance(value, (tuple, list)):
        for item in value:
            _digest(h, item, depth + 1)
    elif depth < 4 and hasattr(value, "weights"):  # ComfyUI's LoRA weight adapters keep their tensors here
        h.update(type(value).__qualname__.encode())
        _digest(h, value.weights, depth + 1)
    else:  # functions and other objects: by kind (their repr holds memory addresses)
        h.update(type(value).__qualname__.encode())


def _prompt_lines(prompts: str) -> list[str]:
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise JobError("1.x-Distill Train: the prompt list is empty. Give one prompt per line (the prompts your users "
                       "will sample; a few hundred varied ones are typical).")
    return lines


def parse_classes(prompts: str, class_names: list[str]) -> list[int] | None:
    """The demo teacher's conditioning: one class name per line, or 'all classes'. None means all ten."""
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise JobError("1.x-Distill Train: the prompt list is empty. Give one prompt per line; for the demo teacher "
                       f"its class names ({', '.join(class_names)}) or '{ALL_CLASSES}'.")
    if any(line.lower() == ALL_CLASSES for line in lines):
        return None
    lookup = {c.lower(): i for i, c in enumerate(class_names)}
    unknown = [line for line in lines if line.lower() not in lookup]
    if unknown:
        raise JobError(f"1.x-Distill Train: the demo teacher is conditioned on class names, and {unknown} are not among "
                       f"them. Use one per line from: {', '.join(class_names)} (or '{ALL_CLASSES}').")
    chosen = sorted({lookup[line.lower()] for line in lines})
    return None if len(chosen) == len(class_names) else chosen


def auto_cached_range(blocks: int, steps: int) -> str:
    """A quarter of the blocks in the middle of the stack: the demo's measured choice (4-6 of 12 at 2 steps, 1.75 NFE;
    the blocks at the ends of the stack cost the most when reused, docs/DISTILL.md) scaled to the family, e.g.
    14-22 of SD3.5 Large's 38 joint blocks, 21-34 of FLUX's 57 (single-stream blocks). A 1-step student has no
    step before its last to reuse from: none."""
    if steps < 2:
        return "none"
    count = max(1, blocks // 4)
    first = (blocks - count) // 2
    return f"{first}-{first + count - 1}"


def resolve_auto(family: str, blocks: int, steps: int, batch_size: int, cached_blocks: str, guidance_scale: float):
    """(batch_size, cached_blocks, guidance_scale) with each value left at auto replaced by the family's default."""
    defaults = FAMILY_DEFAULTS[family]
    if 0 < guidance_scale < 1:
        raise JobError(f"1.x-Distill Train: guidance_scale {guidance_scale} is below 1; use 0 for the model family's "
                       "default, 1 for no CFG, or a larger CFG scale.")
    if (cached_blocks or "").strip().lower() == AUTO:
        cached_blocks = auto_cached_range(blocks, steps)
    return batch_size or defaults["batch_size"], cached_blocks, guidance_scale or defaults["guidance_scale"]


def parse_cached_blocks(text: str, blocks: int, steps: int) -> tuple[int | None, int | None]:
    text = (text or "").strip().lower()
    if text in ("", "none", "off"):
        return None, None
    try:
        first, last = (int(p) for p in text.replace("..", "-").split("-"))
    except ValueError:
        raise JobError(f"1.x-Distill Train: cached_blocks {text!r} is not a range; write e.g. '4-6' (blocks 4 to 6), "
                       f"'{AUTO}' (the family's default) or 'none'.") from None
    if not 0 <= first <= last < blocks:
        raise JobError(f"1.x-Distill Train: cached_blocks {first}-{last} is outside the model's {blocks} blocks (0..{blocks - 1}).")
    if steps < 2:
        raise JobError("1.x-Distill Train: a cached block range needs at least 2 student steps (the last step reuses the one before).")
    return first, last


def _demo_conditioning_writer(classes_path: str, classes: list[int] | None, prompts: str):
    """The demo teacher's class conditioning, written once into the run folder as safetensors (a text family
    will write its CLIP-encoded prompt list here the same way)."""
    def write(run_dir: str) -> None:
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(classes_path, framework="pt") as f:
            context, pooled = f.get_tensor("context"), f.get_tensor("pooled")
        labels = torch.arange(context.shape[0] - 1) if classes is None else torch.tensor(classes)
        save_file({"labels": labels, "context": context[labels].contiguous(), "pooled": pooled[labels].contiguous()},
                  os.path.join(run_dir, jf.CONDITIONING), metadata={"kind": "demo classes", "prompts": prompts})
    return write


def _free_comfy_memory() -> None:
    """exclusive: ComfyUI's own models leave the GPU before the worker starts (public model-management calls). Runs
    after the prompts were encoded (encoding loads the CLIP back onto the GPU) and only when a worker starts."""
    import comfy.model_management as mm

    for name in ("unload_all_models", "soft_empty_cache"):
        fn = getattr(mm, name, None)
        if callable(fn):
            fn()


DEMO_FILE = "demo_teacher.safetensors"
NO_MODEL = "(no model in models/diffusion_models)"


def _model_names(folder_paths) -> list[str]:
    """The files to offer, never an empty list (the frontend shows an empty combo as 'undefined'): a placeholder
    that the node refuses, saying where models go, when the folders hold none."""
    # a demo teacher's class table (<name>.classes.safetensors) sits next to it; it is not a model
    names = [n for n in folder_paths.get_filename_list("diffusion_models") if not n.endswith(".classes.safetensors")]
    return names or [NO_MODEL]


def _default_model(names: list[str]) -> str:
    return DEMO_FILE if DEMO_FILE in names else names[0]


class DistillTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        cpu_threads = max(1, (os.cpu_count() or 2) // 2)
        models = _model_names(folder_paths)
        return io.Schema(
            node_id="XSlimDistillTrain",
            display_name="1.x-Distill Train",
            category=CATEGORY,
            description="Distils a diffusion model into a 1.x-step student in a background worker process and returns at "
            "once with a job handle; the queue stays free. Watch, cancel and resume the job in the '1.x-Distill jobs' "
            "sidebar panel. Queue it again with the same run name to resume a stopped job (or to train longer with more "
            "iterations). Finished students land in models/students.",
            inputs=[
                io.Combo.Input("model_name", options=models, default=_default_model(models), tooltip=(
                    "The model to distil, from the diffusion_models folders (the worker loads the file with ComfyUI's own "
                    "loader): SD3/SD3.5, FLUX, HunyuanVideo, or the demo teacher.")),
                io.String.Input("prompts", multiline=True, default=ALL_CLASSES, tooltip=(
                    "The conditioning to train on, one prompt per line, encoded once by the clip input. For the demo "
                    "teacher: its class names (or 'all classes').")),
                io.String.Input("run_name", default="demo-distill", tooltip=(
                    f"Names the job, its run folder (user/xslim/distill/<name>) and the exported student; {NAME_RULE_TIP}.")),
                io.Int.Input("iterations", default=300, min=1, max=1_000_000, tooltip="Training iterations of the run."),
                io.Int.Input("batch_size", default=0, min=0, max=1024, tooltip=(
                    "Samples per iteration; 0: the model family's default (8 for the demo teacher, 1 for SD3/FLUX/HunyuanVideo).")),
                io.Int.Input("student_steps", default=2, min=1, max=8, tooltip="Sampling steps of the student."),
                io.String.Input("cached_blocks", default=AUTO, tooltip=(
                    "Blocks the student's last step reuses from the step before (through a learned compensation), "
                    "e.g. '4-6' (3 of the demo's 12 blocks: 1.75 NFE), 'none' for a plain N-step student, or 'auto': "
                    "a quarter of the model's blocks in the middle of its stack (the demo's 4-6).")),
                io.Float.Input("guidance_scale", default=0.0, min=0.0, max=20.0, step=0.05, tooltip=(
                    "The teacher's CFG scale; 0: the model family's default (demo 2, SD3.5 4.5, FLUX and HunyuanVideo 1: "
                    "their guidance is built into the model).")),
                io.Float.Input("guidance_switch", default=0.96, min=0.0, max=1.0, step=0.01, tooltip=(
                    "The CFG switch level: the teacher guides only where sigma <= this (1.0: everywhere, plain DMD).")),
                io.Float.Input("lr_student", default=4e-5, min=1e-7, max=1e-2, step=1e-6, round=1e-7, tooltip=(
                    "The student's learning rate (4e-5 in the released recipe; the fake score's lr_fake is 8x this).")),
                io.Float.Input("lr_fake", default=3.2e-4, min=1e-7, max=1e-2, step=1e-6, round=1e-7, tooltip=(
                    "The fake score's learning rate (8x the student's in the released recipe).")),
                io.Int.Input("checkpoint_every", default=25, min=1, max=100_000, tooltip="Iterations between saved checkpoints (what a resume continues from)."),
                io.Int.Input("preview_every", default=25, min=0, max=100_000, tooltip="Iterations between preview grids (0: none)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, tooltip=(  # a run is not re-rolled per queue
                    "The training run's seed (noise, batches, initial adapters). Fixed: queuing again with the same run "
                    "name resumes the same run, which a changed seed would refuse.")),
                io.Combo.Input("gpu_sharing", options=GPU_SHARING, default="exclusive", tooltip=(
                    "exclusive: ComfyUI unloads its models before the worker starts. shared: the worker takes at most "
                    "memory_fraction of the GPU. separate device: nothing is unloaded; give the worker its own device.")),
                io.String.Input("device", default="cpu", tooltip=(
                    "The worker's device: cpu, cuda, cuda:1, or several GPUs as cuda:0,1 (then it runs under torchrun, "
                    "DDP over the GPUs).")),
                io.Float.Input("memory_fraction", default=0.5, min=0.05, max=1.0, step=0.05, tooltip="shared only."),
                io.Int.Input("cpu_threads", default=cpu_threads, min=1, max=256, tooltip="torch threads of the worker."),
                io.Boolean.Input("overwrite_student", default=False, tooltip=(
                    "Replace models/students/<run_name>.safetensors if it exists. Off: a run name whose student exists is refused.")),
                # optional, so prompts and workflows saved before these inputs existed still run
                io.Int.Input("lora_rank", default=32, min=0, max=512, optional=True, tooltip=(
                    "Text-conditioned families: student and fake score are LoRA adapters of this rank on one shared copy "
                    "of the base (0: full copies - three copies of the weights). The demo teacher always trains full copies.")),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16, optional=True,
                             tooltip="Training resolution (pixels), text families."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16, optional=True,
                             tooltip="Training resolution (pixels), text families."),
                io.Int.Input("frames", default=1, min=1, max=257, step=4, optional=True, tooltip="HunyuanVideo: frames per sample (4k+1)."),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "Encodes the prompt list for text-conditioned families (not needed by the demo teacher).")),
            ],
            outputs=[io.String.Output(display_name="job", tooltip="The job handle (its run name) for 1.x-Distill Job Status.")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return time.time()  # starts (or refuses) a job on every queue, never answered from ComfyUI's cache

    @classmethod
    def execute(cls, model_name, prompts, run_name, iterations, batch_size, student_steps, cached_blocks, guidance_scale,
                guidance_switch, lr_student, lr_fake, checkpoint_every, preview_every, seed, gpu_sharing, device,
                memory_fraction, cpu_threads, overwrite_student, lora_rank=32, width=1024, height=1024, frames=1,
                clip=None) -> io.NodeOutput:
        check_run_name(run_name)
        if gpu_sharing not in GPU_SHARING:
            raise JobError(f"1.x-Distill Train: gpu_sharing {gpu_sharing!r} is not one of {GPU_SHARING}.")
        on_gpu = bool(parse_devices(device))
        path, model = _chosen_model(model_name, clip)
        batch_size, cached_blocks, guidance_scale = resolve_auto(model["family"], model["blocks"], student_steps, batch_size,
                                                                 cached_blocks, guidance_scale)
        first, last = parse_cached_blocks(cached_blocks, model["blocks"], student_steps)
        config = {
            "stage": "stage1", "teacher": os.path.abspath(path), "iterations": iterations, "batch_size": batch_size,
            "seed": seed, "checkpoint_every": checkpoint_every, "preview_every": preview_every, "threads": cpu_threads,
            "device": "cuda" if on_gpu else "cpu",
            "stage1": {"steps": student_steps, "guidance_scale": guidance_scale, "guidance_switch": guidance_switch,
                       "lr_student": lr_student, "lr_fake": lr_fake, "cache_first": first, "cache_last": last},
        }
        # the file's size only: its content hash is the worker's job (hashing a big file here would hold the prompt)
        base = {"name": model_name, "family": model["family"], "size": os.path.getsize(path)}
        if model["family"] == DEMO:
            write_extra, bootstrap = _demo_job(model, prompts, config)
        else:
            write_extra, bootstrap = _text_job(model, model_name, prompts, clip, config, base,
                                               dict(lora_rank=lora_rank, width=width, height=height, frames=frames))
        run = _run_request(config)
        gpu = {"mode": {"separate device": "device"}.get(gpu_sharing, gpu_sharing), "device": device, "memory_fraction": memory_fraction}
        # exclusive: ComfyUI's models leave the GPU just before the worker starts, after the CLIP encoded the prompts
        before_start = _free_comfy_memory if gpu["mode"] == "exclusive" else None
        summary, what = manager().submit(run_name, base, run, gpu, overwrite_student, write_extra=write_extra,
                                         bootstrap=bootstrap, before_start=before_start)
        log.info("[1.x-Distill] job %s: %s (batch %s, cached blocks %s, CFG %s); follow it in the '1.x-Distill jobs' "
                 "sidebar panel", run_name, _what_happened(what, summary, manager().run_dir(run_name), iterations),
                 batch_size, cached_blocks, guidance_scale)
        return io.NodeOutput(run_name)


def _what_happened(what: str, summary: dict, run_dir: str, iterations: int) -> str:
    """The log line's account, as the jobs panel will show it: a new job starts at iteration 0, a resumed one at
    its checkpoint's iteration; a job that is running or finished is not said to start."""
    if what == "started":
        return f"started, {iterations} iterations"
    if what == "resumed":
        return f"resumed from iteration {jf.checkpoint_iteration(run_dir) or 0} of {iterations}"
    if what == "already running":
        return f"already running (iteration {summary['iteration']} of {iterations}); nothing new was started"
    return f"{what} (iteration {summary['iteration']} of {summary['iterations']})"


def _run_request(config: dict):
    """The run's settings checked as a run configuration before anything is written or started (a value the
    trainer would refuse is refused here, at queue time, naming the setting)."""
    from distill_core.config import RunRequest

    try:
        return RunRequest(config)
    except (ValueError, TypeError) as err:
        raise JobError(f"1.x-Distill Train: {err} Nothing was started.") from None


def _chosen_model(model_name: str, clip):
    """The model file's path and what it is (family, blocks); refuses a text family without its CLIP."""
    import folder_paths

    path = folder_paths.get_full_path("diffusion_models", model_name)  # a name from the list, never a path
    if model_name == NO_MODEL:
        raise JobError("1.x-Distill Train: no model to distil: put a diffusion-model file (SD3/SD3.5, FLUX, HunyuanVideo) "
                       "into models/diffusion_models, refresh the page and pick it in model_name.")
    if path is None:
        raise JobError(f"1.x-Distill Train: {model_name!r} is not in the diffusion_models folders "
                       f"({', '.join(folder_paths.get_folder_paths('diffusion_models'))}).")
    model = probe_model(model_name, path)
    if model["family"] != DEMO and clip is None and not model.get("text_encoder"):
        raise JobError(f"1.x-Distill Train: {model_name} is a {FAMILY_NAMES[model['family']]} model conditioned on text: "
                       "connect its text encoder (a CLIP output, e.g. from the checkpoint loader or DualCLIPLoader / "
                       "TripleCLIPLoader) to the clip input, so the prompt list can be encoded once before training. "
                       "Nothing was started.")
    return path, model


def _demo_job(model: dict, prompts: str, config: dict):
    classes = parse_classes(prompts, model["class_names"])
    config["stage1"]["classes"] = classes  # the demo's prompts are its classes: compared on resume with the settings
    return _demo_conditioning_writer(model["classes_path"], classes, prompts), None


def _text_job(model: dict, model_name: str, prompts: str, clip, config: dict, base: dict, text: dict):
    """A text family: the worker loads the file with ComfyUI's loader and trains LoRA adapters on the prompt list,
    which the CLIP encodes once when the job is new. The list's and the CLIP's identities go into ``base``, so
    a resume with other prompts or another CLIP is refused (the encoded file of a new job is not rewritten)."""
    try:
        shape = (TEXT_LATENT_SHAPE if model.get("text_encoder")
                 else latent_shape_for(model["family"], text["width"], text["height"], text["frames"]))
    except ValueError as err:
        raise JobError(f"1.x-Distill Train: {err}") from None
    precision = "bf16" if config["device"] == "cuda" else "fp32"  # a GPU run keeps the base in bf16 under autocast
    config.update(teacher_loader=f"{PACK}.nodes.distill_host:load_comfy_file_teacher", prompts=jf.CONDITIONING,
                  lora_rank=text["lora_rank"], precision=precision,
                  teacher_options={"latent_shape": list(shape), "name": model_name, "dtype": precision})
    bootstrap = {"sys_path": [_comfy_root()], "packages": {PACK: PACK_FOLDER}}
    if model.get("text_encoder"):  # the text demo teacher: its own encoder, identified by its content
        from xslim_demo.distill import text_prompt_list

        # "all classes" (the field's default): every prompt it was trained on
        lines = text_prompt_list() if prompts.strip() == ALL_CLASSES else _prompt_lines(prompts)
        with open(model["text_encoder"], "rb") as f:  # under 1 MB: hashed here, unlike a model file
            encoder_id = hashlib.sha256(f.read()).hexdigest()[:16]
        base.update(prompt_list=hashlib.sha256(json.dumps(lines).encode()).hexdigest()[:16], text_encoder=encoder_id)
        return _demo_text_conditioning_writer(model["text_teacher"], lines), bootstrap
    lines = _prompt_lines(prompts)
    base.update(prompt_identities(clip, lines))
    return _text_conditioning_writer(clip, lines), bootstrap


def _placeholder(text: str):
    from PIL import Image, ImageDraw

    from .pictures import to_image_tensor

    img = Image.new("RGB", (320, 120), "white")
    ImageDraw.Draw(img).text((10, 52), text, fill="gray")
    return to_image_tensor(img)


class DistillJobStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimDistillJobStatus",
            display_name="1.x-Distill Job Status",
            category=CATEGORY,
            description="A background job's loss plot and latest preview as images, and its student for Load 1.x Student. "
            "It returns at once with the job as it stands (the jobs panel shows its progress); queue again when the job "
            "is done to sample the finished student. Only with wait_for_finish does the prompt wait for the job, and "
            "then it holds ComfyUI's queue until the job ends (Cancel stops only the waiting, never the job).",
            inputs=[
                io.String.Input("job", force_input=True, tooltip=(
                    "The job handle from 1.x-Distill Train (or a run name from a String node).")),
                io.Boolean.Input("wait_for_finish", default=False, tooltip=(
                    "Off (default): return at once with the job's current state; the queue stays free and the jobs panel "
                    "shows the progress. On: wait until the job is done, stopped or failed - the queue is held for the "
                    "whole training (no other prompt runs meanwhile); Cancel ends the waiting, not the job.")),
            ],
            # the name goes out typed COMBO so it can feed a loader's file list (Load 1.x Student's student_name); its
            # value is the plain file name string
            outputs=[io.Image.Output(display_name="loss_plot"), io.Image.Output(display_name="preview"),
                     io.Custom("COMBO").Output(display_name="student_name", tooltip=(
                         "The finished student's file name in models/students; until the job is done, the job's run name, "
                         "so Load 1.x Student says what state the job is in."))],
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return time.time()  # a job changes between queues: read it afresh every time

    @classmethod
    def execute(cls, job, wait_for_finish) -> io.NodeOutput:
        from PIL import Image

        from .job_pictures import loss_plot
        from .pictures import to_image_tensor

        jobs = manager()
        handle = jobs.job(check_run_name(job))
        summary = jobs.summary(handle)
        if wait_for_finish and summary["state"] in ACTIVE:
            summary = _wait(jobs, handle)
        if wait_for_finish and summary["state"] == "failed":
            raise JobError(f"1.x-Distill Job Status: job {job!r} failed: {summary['message']}")
        title = f"{job}: {summary['state']}, iteration {summary['iteration']} of {summary['iterations']}"
        plot = to_image_tensor(loss_plot(handle.history, title))
        preview_path = jf.latest_preview(handle.run_dir)
        preview = to_image_tensor(Image.open(preview_path)) if preview_path else _placeholder("no preview yet")
        # not done yet: the run name goes out, and Load 1.x Student names the job's state instead of a missing file
        return io.NodeOutput(plot, preview, summary["student"] or job)


def _wait(jobs, handle):
    """Poll the job from this prompt's own thread: ComfyUI's progress bar and Cancel belong to this prompt here.
    The bar counts iterations and shows each new training preview."""
    import comfy.model_management as mm
    from PIL import Image

    from .runner import progress_bar

    summary = jobs.summary(handle)
    bar, shown = progress_bar(summary["iterations"] or 1), None
    while summary["state"] in ACTIVE or (summary["state"] == "done" and summary["student"] is None):
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if summary["preview"] is not None and summary["preview"] != shown:
            path = jf.latest_preview(handle.run_dir)
            try:
                preview = ("JPEG", Image.open(path).convert("RGB"), 512) if path else None
            except OSError:  # being written: the next look shows it
                preview = None
            shown = summary["preview"] if preview is not None else shown
        bar.update_absolute(summary["iteration"] or 0, summary["iterations"] or 1, preview)
        time.sleep(1.0)
        if summary["state"] == "done":
            jobs.export(handle)  # the monitor does this too; whoever comes first
        summary = jobs.summary(handle)
    bar.update_absolute(summary["iteration"] or 0, summary["iterations"] or 1)
    return summary


TRAIN_NODES = [DistillTrain, DistillJobStatus]

__all__ = ["TRAIN_NODES", "DistillTrain", "DistillJobStatus", "FAMILY_DEFAULTS", "auto_cached_range", "clip_identity",
           "parse_cached_blocks", "parse_classes", "probe_model", "prompt_identities", "resolve_auto"]
