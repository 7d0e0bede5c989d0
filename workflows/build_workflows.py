"""Writes the example workflows in ComfyUI's UI format (what the Templates browser lists), with their thumbnails.

Run ``python workflows/build_workflows.py`` after changing a node's widgets; the host tests check every
file against a real ComfyUI's /object_info (node types, widget order and values), and the browser test loads
each one in the real frontend (no alert, no missing or red node, no two nodes overlapping). The layout, ids,
groups, notes and model metadata come from ``workflow_graph.py``.
"""

from __future__ import annotations

import json
import os

from workflow_graph import HERE, Workflow as _Workflow, write_thumbnail

# type -> (input sockets, outputs); only the types these workflows use
SOCKETS = {
    "UNETLoader": ([], ["MODEL"]),
    "CheckpointLoaderSimple": ([], ["MODEL", "CLIP", "VAE"]),
    "DualCLIPLoader": ([], ["CLIP"]),
    "VAELoader": ([], ["VAE"]),
    "ModelSamplingSD3": ([("model", "MODEL")], ["MODEL"]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["CONDITIONING"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["CONDITIONING"]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], ["CONDITIONING"]),
    "EmptySD3LatentImage": ([], ["LATENT"]),
    "EmptyHunyuanLatentVideo": ([], ["LATENT"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")], ["LATENT"]),
    "BasicGuider": ([("model", "MODEL"), ("conditioning", "CONDITIONING")], ["GUIDER"]),
    "RandomNoise": ([], ["NOISE"]),
    "KSamplerSelect": ([], ["SAMPLER"]),
    "BasicScheduler": ([("model", "MODEL")], ["SIGMAS"]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")], ["LATENT", "LATENT"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "VAEDecodeTiled": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "CreateVideo": ([("images", "IMAGE")], ["VIDEO"]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
    "XSlimCache": ([("model", "MODEL")], ["MODEL"]),
    "XSlimStats": ([("model", "MODEL"), ("samples", "LATENT")], ["IMAGE", "STRING", "STRING"]),
    "XSlimCompare": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("vae", "VAE")], ["IMAGE", "STRING"]),
    "XSlimDemoClass": ([], ["CONDITIONING"]),
    "XSlimDemoDecode": ([("samples", "LATENT")], ["IMAGE"]),
    "XSlimStudentLoader": ([("model", "MODEL")], ["MODEL"]),
    "XSlimStudentSigmas": ([("model", "MODEL")], ["SIGMAS"]),
    "XSlimStudentSampler": ([], ["SAMPLER"]),
    "XSlimStudentKSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT"), ("negative", "CONDITIONING")], ["LATENT"]),
    "XSlimStudentCompare": ([("teacher", "MODEL"), ("student", "MODEL"), ("student_2", "MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("vae", "VAE")], ["IMAGE", "STRING"]),
    "Note": ([], []), "MarkdownNote": ([], []),  # the frontend's notes (not server nodes)
}
NEEDS_A_STUDENT = ("This workflow samples a 1.x-Distill student of this base model. The student file ({file}) is not "
                   "shipped: distil one from this very checkpoint with the 1.x-Distill Train node (it exports into "
                   "models/students), then pick it in Load 1.x Student. Until then queuing stops at Load 1.x Student "
                   "with 'value not in list'. The student samples at CFG 1 in {steps} steps; its second step reuses "
                   "blocks through the learned compensation (about 1.7 network evaluations per image).")
CACHE_AUTO = ["auto", "none (online)", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model"]
COMPARE_LINES = "uncached\nslow\nfast\ncustom warn=0.3 crit=0.6"
# X-Slim Compare's table is aligned text about 100 characters wide (8 columns, settings like "slow
# profile=demo_teacher"): its preview box is wide enough to show it unwrapped (the browser test checks)
COMPARE_TABLE = (720, 260)


def Workflow(title: str, description: str = "") -> _Workflow:
    return _Workflow(title, SOCKETS, description)


def sampling_tail(w: Workflow, model: int, pos: int, neg: int, latent: int, vae: tuple, ksampler: list, prefix: str,
                  column: int) -> None:
    """KSampler -> decode -> save, plus the statistics of the cached run (two groups, from ``column`` on)."""
    w.group("Sample and save", column)
    w.link(latent, 0, ks := w.node("KSampler", ksampler), "latent_image")
    for name, src in (("model", model), ("positive", pos), ("negative", neg)):
        w.link(src, 0, ks, name)
    dec = w.node("VAEDecode", [])
    w.link(ks, 0, dec, "samples")
    w.link(vae[0], vae[1], dec, "vae")
    save = w.node("SaveImage", [prefix])
    w.link(dec, 0, save, "images")
    add_stats(w, model, ks, column + 1)


def add_stats(w: Workflow, cached: int, sampler: int, column: int) -> None:
    w.group("What X-Slim did", column)
    stats = w.node("XSlimStats", [])
    w.link(cached, 0, stats, "model")
    w.link(sampler, 0, stats, "samples")
    preview, text = w.node("PreviewImage", [], "X-Slim decision map"), w.node("PreviewAny", [], "X-Slim summary")
    w.link(stats, 0, preview, "images")
    w.link(stats, 1, text, "source")


def add_compare(w: Workflow, model: int, pos: int, neg: int, latent: int, vae, settings: list, prefix: str, column: int) -> None:
    w.group("X-Slim Compare: the same seed uncached and with each setting", column)
    cmp_ = w.node("XSlimCompare", settings)
    for name, src in (("model", model), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, cmp_, name)
    if vae is not None:
        w.link(vae[0], vae[1], cmp_, "vae")
    save = w.node("SaveImage", [prefix], "comparison grid")
    w.link(cmp_, 0, save, "images")
    text = w.node("PreviewAny", [], "comparison table", at_least=COMPARE_TABLE)
    w.link(cmp_, 1, text, "source")


CACHED_NOTE = ("**X-Slim Cache** sits between the model and the sampler: it skips whole steps while the accumulated change "
               "is small, refreshes only the changing blocks in between, and computes fully past the critical line. "
               "*What X-Slim did* shows the per-step decision map and a readable summary.")
COMPARE_NOTE = ("**X-Slim Compare** samples the same seed without caching and with each setting in its text box (one per "
                "line), and returns one grid with effective NFE, fewer block evaluations, the median time of repeats and "
                "PSNR/SSIM against the uncached image.")
MODELS_NOTE = "Missing model files? Loading this workflow lists them with their download links and target folders."


def about(w: Workflow, text: str) -> None:
    w.group("About", 0)
    w.note(f"### {w.title}\n\n{text}")


def cached_or_compared(w: Workflow, compare: bool, model: int, pos: int, neg: int, latent: int, vae, sampling: list,
                       prefix: str) -> Workflow:
    """The two variants of an image workflow: X-Slim Cache -> KSampler, or X-Slim Compare on the same settings.
    ``sampling`` is [steps, cfg, sampler, scheduler]."""
    if compare:
        add_compare(w, model, pos, neg, latent, vae, [0, "fixed", *sampling, COMPARE_LINES], f"{prefix}_compare", 2)
        return w
    w.group("X-Slim", 1)
    cache = w.node("XSlimCache", CACHE_AUTO)
    w.link(model, 0, cache, "model")
    sampling_tail(w, cache, pos, neg, latent, vae, [0, "randomize", *sampling, 1.0], prefix, 2)
    return w


def guided_prompt(w: Workflow, clip: int, prompt: str, guidance: float) -> tuple[int, int]:
    """The Prompt group of the guidance-distilled families (FLUX, HunyuanVideo): text, then FluxGuidance."""
    w.group("Prompt", 1)
    text = w.node("CLIPTextEncode", [prompt])
    w.link(clip, 0, text, "clip")
    pos = w.node("FluxGuidance", [guidance])
    w.link(text, 0, pos, "conditioning")
    return text, pos


def flux(compare: bool) -> Workflow:
    w = Workflow("X-Slim FLUX.1-dev" + (" compare" if compare else ""), "FLUX.1-dev text-to-image with X-Slim")
    about(w, (COMPARE_NOTE if compare else CACHED_NOTE) + "\n\nFLUX.1-dev, 20 steps, CFG 1 with FluxGuidance 3.5. " + MODELS_NOTE)
    w.group("Load models", 0)
    unet = w.node("UNETLoader", ["flux1-dev.safetensors", "default"])
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    vae = w.node("VAELoader", ["ae.safetensors"])
    text, pos = guided_prompt(w, clip, "a red fox in fresh snow, morning light, 35mm photo", 3.5)
    neg = w.node("ConditioningZeroOut", [])
    w.link(text, 0, neg, "conditioning")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    return cached_or_compared(w, compare, unet, pos, neg, latent, (vae, 0), [20, 1.0, "euler", "simple"], "xslim_flux")


def sd35(compare: bool) -> Workflow:
    w = Workflow("X-Slim SD3.5" + (" compare" if compare else ""), "Stable Diffusion 3.5 Large with X-Slim")
    about(w, (COMPARE_NOTE if compare else CACHED_NOTE) + "\n\nSD3.5 Large (fp8 checkpoint), 28 steps, CFG 4.5, shift 3. " + MODELS_NOTE)
    w.group("Load models", 0)
    ckpt = w.node("CheckpointLoaderSimple", ["sd3.5_large_fp8_scaled.safetensors"])
    shift = w.node("ModelSamplingSD3", [3.0])
    w.link(ckpt, 0, shift, "model")
    w.group("Prompt", 1)
    pos = w.node("CLIPTextEncode", ["a lighthouse on a cliff at dusk, oil painting"], "positive")
    neg = w.node("CLIPTextEncode", ["blurry, low quality"], "negative")
    w.link(ckpt, 1, pos, "clip")
    w.link(ckpt, 1, neg, "clip")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    return cached_or_compared(w, compare, shift, pos, neg, latent, (ckpt, 2), [28, 4.5, "euler", "sgm_uniform"], "xslim_sd35")


def hunyuan_video(compare: bool) -> Workflow:
    w = Workflow("X-Slim HunyuanVideo text-to-video" + (" compare" if compare else ""), "HunyuanVideo text-to-video with X-Slim")
    clip_note = "a 25-frame clip per setting" if compare else "73 frames at 848x480, tiled VAE decode"
    about(w, (COMPARE_NOTE if compare else CACHED_NOTE) + f"\n\nHunyuanVideo T2V 720p, 20 steps, shift 7, {clip_note}. " + MODELS_NOTE)
    w.group("Load models", 0)
    unet = w.node("UNETLoader", ["hunyuan_video_t2v_720p_bf16.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [7.0])
    w.link(unet, 0, shift, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"])
    vae = w.node("VAELoader", ["hunyuan_video_vae_bf16.safetensors"])
    text, pos = guided_prompt(w, clip, "a paper boat drifting down a rainy street, cinematic", 6.0)
    if compare:  # short clip: every setting samples and decodes it once
        neg = w.node("ConditioningZeroOut", [])
        w.link(text, 0, neg, "conditioning")
        latent = w.node("EmptyHunyuanLatentVideo", [848, 480, 25, 1])
        add_compare(w, shift, pos, neg, latent, (vae, 0), [0, "fixed", 20, 1.0, "euler", "simple", COMPARE_LINES], "xslim_hunyuan_compare", 2)
        return w
    w.group("X-Slim", 1)
    cache = w.node("XSlimCache", CACHE_AUTO)
    w.link(shift, 0, cache, "model")
    sca = custom_sampler(w, cache, shift, pos, ("BasicScheduler", ["simple", 20, 1.0]), "KSamplerSelect", ["euler"], 2)
    video_tail(w, sca, vae, "video/xslim_hunyuan", 3)
    add_stats(w, cache, sca, 4)
    return w


def custom_sampler(w: Workflow, model: int, schedule_model: int, pos: int, scheduler: tuple, sampler_type: str,
                   sampler_widgets: list, column: int) -> int:
    """BasicGuider + noise + sampler + sigmas -> SamplerCustomAdvanced on a 73-frame HunyuanVideo latent."""
    w.group("Sample", column)
    latent = w.node("EmptyHunyuanLatentVideo", [848, 480, 73, 1])
    noise, sampler = w.node("RandomNoise", [0, "randomize"]), w.node(sampler_type, sampler_widgets)
    sigmas = w.node(*scheduler)
    w.link(schedule_model, 0, sigmas, "model")
    guider = w.node("BasicGuider", [])
    w.link(model, 0, guider, "model")
    w.link(pos, 0, guider, "conditioning")
    sca = w.node("SamplerCustomAdvanced", [])
    for name, src in (("noise", noise), ("guider", guider), ("sampler", sampler), ("sigmas", sigmas), ("latent_image", latent)):
        w.link(src, 0, sca, name)
    return sca


def video_tail(w: Workflow, sca: int, vae: int, prefix: str, column: int) -> None:
    w.group("Decode and save the video", column)
    dec = w.node("VAEDecodeTiled", [256, 64, 64, 8])
    w.link(sca, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    video = w.node("CreateVideo", [24.0])
    w.link(dec, 0, video, "images")
    w.link(video, 0, w.node("SaveVideo", [prefix, "auto", "auto"]), "video")


def demo_cpu() -> Workflow:
    """The shipped demo model (Fashion-MNIST, HunyuanVideo architecture): runs on any CPU in about a minute."""
    w = Workflow("X-Slim demo on CPU (no GPU needed)", "X-Slim on the shipped demo model, on any CPU")
    about(w, "The shipped demo model (a 5 M-parameter HunyuanVideo-architecture DiT trained on Fashion-MNIST) draws 4 "
             "sneakers in 50 steps. " + CACHED_NOTE + "\n\n" + COMPARE_NOTE + "\n\nNo GPU and no downloads: it runs on "
             "any CPU in about a minute.")
    w.group("Load the demo model", 0)
    unet = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [1.0])
    w.link(unet, 0, shift, "model")
    w.group("Prompt", 1)
    pos, neg = w.node("XSlimDemoClass", ["Sneaker"], "positive"), w.node("XSlimDemoClass", ["unconditional"], "negative")
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 4])
    w.group("X-Slim", 1)
    cache = w.node("XSlimCache", ["slow", "demo_teacher", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model"])
    w.link(shift, 0, cache, "model")
    w.group("Sample and save", 2)
    ks = w.node("KSampler", [0, "fixed", 50, 3.0, "euler", "simple", 1.0])
    for name, src in (("model", cache), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("XSlimDemoDecode", [])
    w.link(ks, 0, dec, "samples")
    save = w.node("SaveImage", ["xslim_demo"])
    w.link(dec, 0, save, "images")
    add_stats(w, cache, ks, 3)
    add_compare(w, shift, pos, neg, latent, None, [0, "fixed", 50, 3.0, "euler", "simple",
                                                 "uncached\nslow profile=demo_teacher\nfast profile=demo_teacher\nslow\nfast"], "xslim_demo_compare", 2)
    return w


def student_demo_cpu() -> Workflow:
    """The shipped demo students next to their teacher: runs on any CPU in well under a minute."""
    w = Workflow("1.x student demo on CPU (no GPU needed)", "The shipped 1.x-Distill students of the demo model")
    about(w, "The shipped 1.x-Distill students of the demo model (Fashion-MNIST): the 1.75-NFE student (blocks 4..6 "
             "cached at its second step) and the 1.67-NFE one (4..7), sampled with the one-node 1.x Student KSampler, "
             "and 1.x Student Compare: teacher at 50 steps with CFG 2 (100 network evaluations per image), the teacher "
             "with X-Slim, and both students, with the demo classifier's accuracy on the prompted class.")
    w.group("Load the demo model and its students", 0)
    unet = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [1.0])
    w.link(unet, 0, shift, "model")
    s175 = w.node("XSlimStudentLoader", ["student_1x_175.safetensors", "strict"], "1.75-NFE student")
    s167 = w.node("XSlimStudentLoader", ["student_1x_167.safetensors", "strict"], "1.67-NFE student")
    for s in (s175, s167):
        w.link(shift, 0, s, "model")
    w.group("Prompt", 1)
    pos, neg = w.node("XSlimDemoClass", ["Sneaker"], "positive"), w.node("XSlimDemoClass", ["unconditional"], "negative")
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 8])
    w.group("Sample with the student and save", 2)
    ks = w.node("XSlimStudentKSampler", [0, "fixed"])
    for name, src in (("model", s175), ("positive", pos), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("XSlimDemoDecode", [])
    w.link(ks, 0, dec, "samples")
    save = w.node("SaveImage", ["xslim_student_demo"])
    w.link(dec, 0, save, "images")
    add_stats(w, s175, ks, 3)
    w.group("Teacher vs students", 2)
    cmp_ = w.node("XSlimStudentCompare", [0, "fixed", 50, 2.0, "euler", "simple", "fast profile=demo_teacher"])
    for name, src in (("teacher", shift), ("student", s175), ("student_2", s167), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, cmp_, name)
    grid = w.node("SaveImage", ["xslim_student_compare"], "teacher vs students")
    w.link(cmp_, 0, grid, "images")
    table = w.node("PreviewAny", [], "comparison table", at_least=COMPARE_TABLE)
    w.link(cmp_, 1, table, "source")
    return w


def student_image_tail(w: Workflow, student: int, pos: int, latent: int, vae: tuple, prefix: str, column: int) -> None:
    """1.x Student KSampler -> VAE decode -> save, plus the student run's decision map."""
    w.group("Sample with the student and save", column)
    ks = w.node("XSlimStudentKSampler", [0, "randomize"])
    for name, src in (("model", student), ("positive", pos), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("VAEDecode", [])
    w.link(ks, 0, dec, "samples")
    w.link(vae[0], vae[1], dec, "vae")
    w.link(dec, 0, w.node("SaveImage", [prefix]), "images")
    add_stats(w, student, ks, column + 1)


def student_sd35() -> Workflow:
    w = Workflow("1.x student SD3.5", "A 1.x-Distill student of SD3.5 Large")
    about(w, NEEDS_A_STUDENT.format(file="sd3.5_large_1x.safetensors", steps=2) + " " + MODELS_NOTE)
    w.group("Load models", 0)
    ckpt = w.node("CheckpointLoaderSimple", ["sd3.5_large_fp8_scaled.safetensors"])
    shift = w.node("ModelSamplingSD3", [3.0])
    w.link(ckpt, 0, shift, "model")
    student = w.node("XSlimStudentLoader", ["sd3.5_large_1x.safetensors", "trust (same weights, other precision)"])
    w.link(shift, 0, student, "model")
    w.group("Prompt", 1)
    pos = w.node("CLIPTextEncode", ["a lighthouse on a cliff at dusk, oil painting"])
    w.link(ckpt, 1, pos, "clip")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    student_image_tail(w, student, pos, latent, (ckpt, 2), "xslim_student_sd35", 2)
    return w


def student_flux() -> Workflow:
    w = Workflow("1.x student FLUX.1-dev", "A 1.x-Distill student of FLUX.1-dev")
    about(w, NEEDS_A_STUDENT.format(file="flux1-dev_1x.safetensors", steps=2) + " " + MODELS_NOTE)
    w.group("Load models", 0)
    unet = w.node("UNETLoader", ["flux1-dev.safetensors", "default"])
    student = w.node("XSlimStudentLoader", ["flux1-dev_1x.safetensors", "strict"])
    w.link(unet, 0, student, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    vae = w.node("VAELoader", ["ae.safetensors"])
    text, pos = guided_prompt(w, clip, "a red fox in fresh snow, morning light, 35mm photo", 3.5)
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    student_image_tail(w, student, pos, latent, (vae, 0), "xslim_student_flux", 2)
    return w


def student_hunyuan_video() -> Workflow:
    """The custom-sampler path: 1.x Student Sigmas + 1.x Student Sampler in SamplerCustomAdvanced."""
    w = Workflow("1.x student HunyuanVideo text-to-video", "A 1.x-Distill student of HunyuanVideo T2V")
    about(w, NEEDS_A_STUDENT.format(file="hunyuan_video_t2v_1x.safetensors", steps=2) + " " + MODELS_NOTE)
    w.group("Load models", 0)
    unet = w.node("UNETLoader", ["hunyuan_video_t2v_720p_bf16.safetensors", "default"])
    student = w.node("XSlimStudentLoader", ["hunyuan_video_t2v_1x.safetensors", "strict"])
    w.link(unet, 0, student, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"])
    vae = w.node("VAELoader", ["hunyuan_video_vae_bf16.safetensors"])
    text, pos = guided_prompt(w, clip, "a paper boat drifting down a rainy street, cinematic", 6.0)
    sca = custom_sampler(w, student, student, pos, ("XSlimStudentSigmas", []), "XSlimStudentSampler", [], 2)
    video_tail(w, sca, vae, "video/xslim_student_hunyuan", 3)
    add_stats(w, student, sca, 4)
    return w


# file -> builder; built when written (importing this module builds nothing, so a test can read SOCKETS cheaply)
WORKFLOWS = {
    "xslim_demo_cpu.json": demo_cpu,
    "xslim_flux_dev.json": lambda: flux(False), "xslim_flux_dev_compare.json": lambda: flux(True),
    "xslim_sd35.json": lambda: sd35(False), "xslim_sd35_compare.json": lambda: sd35(True),
    "xslim_hunyuan_video_t2v.json": lambda: hunyuan_video(False), "xslim_hunyuan_video_t2v_compare.json": lambda: hunyuan_video(True),
    "student_demo_cpu.json": student_demo_cpu, "student_sd35.json": student_sd35, "student_flux_dev.json": student_flux,
    "student_hunyuan_video_t2v.json": student_hunyuan_video,
}

# The Templates browser's card per workflow: a real output where it runs here (CPU), else a placeholder.
# workflow -> (picture, caption, rows to keep or None); the pictures are outputs of real runs (docs/)
REAL_THUMBNAILS = {
    "xslim_demo_cpu.json": ("../docs/comfyui/demo_compare.png", "X-Slim Compare's grid from this workflow", None),
    "student_demo_cpu.json": ("../docs/comfyui/student_compare.png", "1.x Student Compare's grid from this workflow", None),
}


def needs(workflow) -> list[str]:
    files = [m["name"] for n in workflow.nodes for m in n["properties"].get("models", [])]
    return ["Needs: " + ", ".join(dict.fromkeys(files))] if files else []


def write_all(workflows: dict = WORKFLOWS, thumbnails: dict = REAL_THUMBNAILS, here: str = HERE) -> None:
    """Every workflow file and its card. A card whose picture is missing is an error, not a silent placeholder:
    the frontend asks for <name>.jpg for every template and shows a broken card without one."""
    for name, build in workflows.items():
        workflow = build()
        with open(os.path.join(here, name), "w") as f:
            json.dump(workflow.to_json(), f, indent=1)
        thumb = os.path.join(here, name[:-5] + ".jpg")
        if name in thumbnails:
            picture, caption, rows = thumbnails[name]
            write_thumbnail(thumb, workflow.title, [caption], os.path.join(here, picture), rows)
        else:
            write_thumbnail(thumb, workflow.title, [workflow.description] + needs(workflow))
        print("wrote", name, "and its thumbnail")


if __name__ == "__main__":
    write_all()
