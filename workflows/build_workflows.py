"""Writes the example workflows in ComfyUI's UI format (what the Templates browser lists).

Run ``python workflows/build_workflows.py`` after changing a node's widgets; the host tests check every
file against a real ComfyUI's /object_info (node types, widget order and values).
"""

from __future__ import annotations

import json
import os

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
    "XSlimStats": ([("model", "MODEL"), ("samples", "LATENT")], ["IMAGE", "STRING"]),
    "XSlimCompare": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("vae", "VAE")], ["IMAGE", "STRING"]),
    "XSlimDemoClass": ([], ["CONDITIONING"]),
    "XSlimDemoDecode": ([("samples", "LATENT")], ["IMAGE"]),
    "XSlimStudentLoader": ([("model", "MODEL")], ["MODEL"]),
    "XSlimStudentSigmas": ([("model", "MODEL")], ["SIGMAS"]),
    "XSlimStudentSampler": ([], ["SAMPLER"]),
    "XSlimStudentKSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT"), ("negative", "CONDITIONING")], ["LATENT"]),
    "XSlimStudentCompare": ([("teacher", "MODEL"), ("student", "MODEL"), ("student_2", "MODEL"), ("positive", "CONDITIONING"),
                             ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("vae", "VAE")], ["IMAGE", "STRING"]),
    "Note": ([], []),  # the frontend's note (not a server node)
}
NEEDS_A_STUDENT = ("This workflow samples a 1.x-Distill student of this base model. The student file ({file}) is not "
                   "shipped: distil one from this very checkpoint with the 1.x-Distill Train node (it exports into "
                   "models/students), then pick it in Load 1.x Student. Until then queuing stops at Load 1.x Student "
                   "with 'value not in list'. The student samples at CFG 1 in {steps} steps; its second step reuses "
                   "blocks through the learned compensation (about 1.7 network evaluations per image).")
CACHE_AUTO = ["auto", "none (online)", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model"]
COMPARE_LINES = "uncached\nslow\nfast\ncustom warn=0.3 crit=0.6"


class Workflow:
    def __init__(self, title: str):
        self.title, self.nodes, self.links = title, [], []

    def node(self, type_: str, widgets: list, title: str | None = None) -> int:
        sockets, outputs = SOCKETS[type_]
        n = len(self.nodes) + 1
        col, row = divmod(n - 1, 4)
        self.nodes.append({
            "id": n, "type": type_, "pos": [40 + 380 * col, 60 + 260 * row], "size": [340, 200], "flags": {},
            "order": n - 1, "mode": 0,
            "inputs": [{"name": name, "type": t, "link": None} for name, t in sockets],
            "outputs": [{"name": t, "type": t, "links": [], "slot_index": i} for i, t in enumerate(outputs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": widgets,
            **({"title": title} if title else {}),
        })
        return n

    def link(self, src: int, slot: int, dst: int, input_name: str) -> None:
        link_id = len(self.links) + 1
        source, target = self.nodes[src - 1], self.nodes[dst - 1]
        inp = next(i for i in target["inputs"] if i["name"] == input_name)
        inp["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, target["inputs"].index(inp), source["outputs"][slot]["type"]])

    def to_json(self) -> dict:
        return {
            "id": self.title, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "info": {"title": self.title}}, "version": 0.4,
        }


def sampling_tail(w: Workflow, model: int, pos: int, neg: int, latent: int, vae: int, ksampler: list, prefix: str) -> None:
    """KSampler -> decode -> save, plus the statistics of the cached run."""
    ks = w.node("KSampler", ksampler)
    for name, src in (("model", model), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("VAEDecode", [])
    w.link(ks, 0, dec, "samples")
    w.link(vae[0], vae[1], dec, "vae")
    save = w.node("SaveImage", [prefix])
    w.link(dec, 0, save, "images")
    add_stats(w, model, ks)


def add_stats(w: Workflow, cached: int, sampler: int) -> None:
    stats = w.node("XSlimStats", [])
    w.link(cached, 0, stats, "model")
    w.link(sampler, 0, stats, "samples")
    preview, text = w.node("PreviewImage", [], "X-Slim decision map"), w.node("PreviewAny", [], "X-Slim summary")
    w.link(stats, 0, preview, "images")
    w.link(stats, 1, text, "source")


def add_compare(w: Workflow, model: int, pos: int, neg: int, latent: int, vae, settings: list, prefix: str) -> None:
    cmp_ = w.node("XSlimCompare", settings)
    for name, src in (("model", model), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, cmp_, name)
    if vae is not None:
        w.link(vae[0], vae[1], cmp_, "vae")
    save = w.node("SaveImage", [prefix], "comparison grid")
    w.link(cmp_, 0, save, "images")
    text = w.node("PreviewAny", [], "comparison table")
    w.link(cmp_, 1, text, "source")


def cached_or_compared(w: Workflow, compare: bool, model: int, pos: int, neg: int, latent: int, vae, sampling: list,
                       prefix: str) -> Workflow:
    """The two variants of an image workflow: X-Slim Cache -> KSampler, or X-Slim Compare on the same settings.
    ``sampling`` is [steps, cfg, sampler, scheduler]."""
    if compare:
        add_compare(w, model, pos, neg, latent, vae, [0, "fixed", *sampling, COMPARE_LINES], f"{prefix}_compare")
        return w
    cache = w.node("XSlimCache", CACHE_AUTO)
    w.link(model, 0, cache, "model")
    sampling_tail(w, cache, pos, neg, latent, vae, [0, "randomize", *sampling, 1.0], prefix)
    return w


def flux(compare: bool) -> Workflow:
    w = Workflow("X-Slim FLUX.1-dev" + (" compare" if compare else ""))
    unet = w.node("UNETLoader", ["flux1-dev.safetensors", "default"])
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    text = w.node("CLIPTextEncode", ["a red fox in fresh snow, morning light, 35mm photo"])
    w.link(clip, 0, text, "clip")
    pos = w.node("FluxGuidance", [3.5])
    w.link(text, 0, pos, "conditioning")
    neg = w.node("ConditioningZeroOut", [])
    w.link(text, 0, neg, "conditioning")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    vae = w.node("VAELoader", ["ae.safetensors"])
    return cached_or_compared(w, compare, unet, pos, neg, latent, (vae, 0), [20, 1.0, "euler", "simple"], "xslim_flux")


def sd35(compare: bool) -> Workflow:
    w = Workflow("X-Slim SD3.5" + (" compare" if compare else ""))
    ckpt = w.node("CheckpointLoaderSimple", ["sd3.5_large_fp8_scaled.safetensors"])
    shift = w.node("ModelSamplingSD3", [3.0])
    w.link(ckpt, 0, shift, "model")
    pos = w.node("CLIPTextEncode", ["a lighthouse on a cliff at dusk, oil painting"])
    neg = w.node("CLIPTextEncode", ["blurry, low quality"])
    w.link(ckpt, 1, pos, "clip")
    w.link(ckpt, 1, neg, "clip")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    return cached_or_compared(w, compare, shift, pos, neg, latent, (ckpt, 2), [28, 4.5, "euler", "sgm_uniform"], "xslim_sd35")


def hunyuan_video(compare: bool) -> Workflow:
    w = Workflow("X-Slim HunyuanVideo text-to-video" + (" compare" if compare else ""))
    unet = w.node("UNETLoader", ["hunyuan_video_t2v_720p_bf16.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [7.0])
    w.link(unet, 0, shift, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"])
    text = w.node("CLIPTextEncode", ["a paper boat drifting down a rainy street, cinematic"])
    w.link(clip, 0, text, "clip")
    pos = w.node("FluxGuidance", [6.0])
    w.link(text, 0, pos, "conditioning")
    vae = w.node("VAELoader", ["hunyuan_video_vae_bf16.safetensors"])
    if compare:  # short clip: every setting samples and decodes it once
        latent = w.node("EmptyHunyuanLatentVideo", [848, 480, 25, 1])
        neg = w.node("ConditioningZeroOut", [])
        w.link(text, 0, neg, "conditioning")
        add_compare(w, shift, pos, neg, latent, (vae, 0), [0, "fixed", 20, 1.0, "euler", "simple", COMPARE_LINES], "xslim_hunyuan_compare")
        return w
    latent = w.node("EmptyHunyuanLatentVideo", [848, 480, 73, 1])
    cache = w.node("XSlimCache", CACHE_AUTO)
    w.link(shift, 0, cache, "model")
    guider = w.node("BasicGuider", [])
    w.link(cache, 0, guider, "model")
    w.link(pos, 0, guider, "conditioning")
    noise, sampler = w.node("RandomNoise", [0, "randomize"]), w.node("KSamplerSelect", ["euler"])
    sigmas = w.node("BasicScheduler", ["simple", 20, 1.0])
    w.link(shift, 0, sigmas, "model")
    sca = w.node("SamplerCustomAdvanced", [])
    for name, src in (("noise", noise), ("guider", guider), ("sampler", sampler), ("sigmas", sigmas), ("latent_image", latent)):
        w.link(src, 0, sca, name)
    dec = w.node("VAEDecodeTiled", [256, 64, 64, 8])
    w.link(sca, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    video = w.node("CreateVideo", [24.0])
    w.link(dec, 0, video, "images")
    save = w.node("SaveVideo", ["video/xslim_hunyuan", "auto", "auto"])
    w.link(video, 0, save, "video")
    add_stats(w, cache, sca)
    return w


def demo_cpu() -> Workflow:
    """The shipped demo model (Fashion-MNIST, HunyuanVideo architecture): runs on any CPU in about a minute."""
    w = Workflow("X-Slim demo on CPU (no GPU needed)")
    unet = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [1.0])
    w.link(unet, 0, shift, "model")
    pos, neg = w.node("XSlimDemoClass", ["Sneaker"]), w.node("XSlimDemoClass", ["unconditional"])
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 4])
    cache = w.node("XSlimCache", ["slow", "demo_teacher", 0.1, 0.3, 0.0, 0.5, 0.0, 1.0, "same as model", "same as model"])
    w.link(shift, 0, cache, "model")
    ks = w.node("KSampler", [0, "fixed", 50, 3.0, "euler", "simple", 1.0])
    for name, src in (("model", cache), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("XSlimDemoDecode", [])
    w.link(ks, 0, dec, "samples")
    save = w.node("SaveImage", ["xslim_demo"])
    w.link(dec, 0, save, "images")
    add_stats(w, cache, ks)
    add_compare(w, shift, pos, neg, latent, None, [0, "fixed", 50, 3.0, "euler", "simple",
                                                 "uncached\nslow profile=demo_teacher\nfast profile=demo_teacher\nslow\nfast"], "xslim_demo_compare")
    return w


def student_demo_cpu() -> Workflow:
    """The shipped demo students next to their teacher: runs on any CPU in well under a minute."""
    w = Workflow("1.x student demo on CPU (no GPU needed)")
    w.node("Note", ["The shipped 1.x-Distill students of the demo model (Fashion-MNIST): the 1.75-NFE student (blocks 4..6 "
                    "cached at its second step) and the 1.67-NFE one (4..7), sampled with the one-node 1.x Student KSampler, "
                    "and 1.x Student Compare: teacher at 50 steps with CFG 2 (100 network evaluations per image), the teacher "
                    "with X-Slim, and both students, with the demo classifier's accuracy on the prompted class."])
    unet = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    shift = w.node("ModelSamplingSD3", [1.0])
    w.link(unet, 0, shift, "model")
    pos, neg = w.node("XSlimDemoClass", ["Sneaker"]), w.node("XSlimDemoClass", ["unconditional"])
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 8])
    s175 = w.node("XSlimStudentLoader", ["student_1x_175.safetensors", "strict"])
    s167 = w.node("XSlimStudentLoader", ["student_1x_167.safetensors", "strict"])
    for s in (s175, s167):
        w.link(shift, 0, s, "model")
    ks = w.node("XSlimStudentKSampler", [0, "fixed"])
    for name, src in (("model", s175), ("positive", pos), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("XSlimDemoDecode", [])
    w.link(ks, 0, dec, "samples")
    save = w.node("SaveImage", ["xslim_student_demo"])
    w.link(dec, 0, save, "images")
    add_stats(w, s175, ks)
    cmp_ = w.node("XSlimStudentCompare", [0, "fixed", 50, 2.0, "euler", "simple", "fast profile=demo_teacher"])
    for name, src in (("teacher", shift), ("student", s175), ("student_2", s167), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, cmp_, name)
    grid = w.node("SaveImage", ["xslim_student_compare"], "teacher vs students")
    w.link(cmp_, 0, grid, "images")
    table = w.node("PreviewAny", [], "comparison table")
    w.link(cmp_, 1, table, "source")
    return w


def student_image_tail(w: Workflow, student: int, pos: int, latent: int, vae: tuple, prefix: str) -> None:
    """1.x Student KSampler -> VAE decode -> save, plus the student run's decision map."""
    ks = w.node("XSlimStudentKSampler", [0, "randomize"])
    for name, src in (("model", student), ("positive", pos), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("VAEDecode", [])
    w.link(ks, 0, dec, "samples")
    w.link(vae[0], vae[1], dec, "vae")
    w.link(dec, 0, w.node("SaveImage", [prefix]), "images")
    add_stats(w, student, ks)


def student_sd35() -> Workflow:
    w = Workflow("1.x student SD3.5")
    w.node("Note", [NEEDS_A_STUDENT.format(file="sd3.5_large_1x.safetensors", steps=2)])
    ckpt = w.node("CheckpointLoaderSimple", ["sd3.5_large_fp8_scaled.safetensors"])
    shift = w.node("ModelSamplingSD3", [3.0])
    w.link(ckpt, 0, shift, "model")
    student = w.node("XSlimStudentLoader", ["sd3.5_large_1x.safetensors", "trust (same weights, other precision)"])
    w.link(shift, 0, student, "model")
    pos = w.node("CLIPTextEncode", ["a lighthouse on a cliff at dusk, oil painting"])
    w.link(ckpt, 1, pos, "clip")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    student_image_tail(w, student, pos, latent, (ckpt, 2), "xslim_student_sd35")
    return w


def student_flux() -> Workflow:
    w = Workflow("1.x student FLUX.1-dev")
    w.node("Note", [NEEDS_A_STUDENT.format(file="flux1-dev_1x.safetensors", steps=2)])
    unet = w.node("UNETLoader", ["flux1-dev.safetensors", "default"])
    student = w.node("XSlimStudentLoader", ["flux1-dev_1x.safetensors", "strict"])
    w.link(unet, 0, student, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    text = w.node("CLIPTextEncode", ["a red fox in fresh snow, morning light, 35mm photo"])
    w.link(clip, 0, text, "clip")
    pos = w.node("FluxGuidance", [3.5])
    w.link(text, 0, pos, "conditioning")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    vae = w.node("VAELoader", ["ae.safetensors"])
    student_image_tail(w, student, pos, latent, (vae, 0), "xslim_student_flux")
    return w


def student_hunyuan_video() -> Workflow:
    """The custom-sampler path: 1.x Student Sigmas + 1.x Student Sampler in SamplerCustomAdvanced."""
    w = Workflow("1.x student HunyuanVideo text-to-video")
    w.node("Note", [NEEDS_A_STUDENT.format(file="hunyuan_video_t2v_1x.safetensors", steps=2)])
    unet = w.node("UNETLoader", ["hunyuan_video_t2v_720p_bf16.safetensors", "default"])
    student = w.node("XSlimStudentLoader", ["hunyuan_video_t2v_1x.safetensors", "strict"])
    w.link(unet, 0, student, "model")
    clip = w.node("DualCLIPLoader", ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"])
    text = w.node("CLIPTextEncode", ["a paper boat drifting down a rainy street, cinematic"])
    w.link(clip, 0, text, "clip")
    pos = w.node("FluxGuidance", [6.0])
    w.link(text, 0, pos, "conditioning")
    guider = w.node("BasicGuider", [])
    w.link(student, 0, guider, "model")
    w.link(pos, 0, guider, "conditioning")
    noise, sampler = w.node("RandomNoise", [0, "randomize"]), w.node("XSlimStudentSampler", [])
    sigmas = w.node("XSlimStudentSigmas", [])
    w.link(student, 0, sigmas, "model")
    latent = w.node("EmptyHunyuanLatentVideo", [848, 480, 73, 1])
    sca = w.node("SamplerCustomAdvanced", [])
    for name, src in (("noise", noise), ("guider", guider), ("sampler", sampler), ("sigmas", sigmas), ("latent_image", latent)):
        w.link(src, 0, sca, name)
    vae = w.node("VAELoader", ["hunyuan_video_vae_bf16.safetensors"])
    dec = w.node("VAEDecodeTiled", [256, 64, 64, 8])
    w.link(sca, 0, dec, "samples")
    w.link(vae, 0, dec, "vae")
    video = w.node("CreateVideo", [24.0])
    w.link(dec, 0, video, "images")
    w.link(video, 0, w.node("SaveVideo", ["video/xslim_student_hunyuan", "auto", "auto"]), "video")
    add_stats(w, student, sca)
    return w


WORKFLOWS = {
    "xslim_demo_cpu.json": demo_cpu(),
    "xslim_flux_dev.json": flux(False), "xslim_flux_dev_compare.json": flux(True),
    "xslim_sd35.json": sd35(False), "xslim_sd35_compare.json": sd35(True),
    "xslim_hunyuan_video_t2v.json": hunyuan_video(False), "xslim_hunyuan_video_t2v_compare.json": hunyuan_video(True),
    "student_demo_cpu.json": student_demo_cpu(), "student_sd35.json": student_sd35(), "student_flux_dev.json": student_flux(),
    "student_hunyuan_video_t2v.json": student_hunyuan_video(),
}

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, workflow in WORKFLOWS.items():
        with open(os.path.join(here, name), "w") as f:
            json.dump(workflow.to_json(), f, indent=1)
        print("wrote", name)
