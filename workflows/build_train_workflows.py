"""Writes the 1.x-Distill training workflows (UI format, listed by ComfyUI's Templates browser).

    python workflows/build_train_workflows.py

* ``xslim_distill_demo_cpu.json``: distils the shipped demo teacher in the background for a few minutes on a CPU,
  waits for the job (the Job Status node), then samples the finished student next to the teacher.
The host tests check the file against a real ComfyUI's /object_info.
"""

from __future__ import annotations

import json
import os

from build_workflows import SOCKETS, Workflow

SOCKETS.update({
    "XSlimDistillTrain": ([("clip", "CLIP")], ["STRING"]),
    "XSlimDistillJobStatus": ([("job", "STRING")], ["IMAGE", "IMAGE", "COMBO"]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], ["IMAGE"]),
})
# model_name, prompts, run_name, iterations, batch_size, student_steps, cached_blocks, guidance_scale, guidance_switch,
# lr_student, lr_fake, checkpoint_every, preview_every, seed, gpu_sharing, device, memory_fraction, cpu_threads,
# overwrite_student: about four minutes on two CPU cores
DEMO_TRAIN = ["demo_teacher.safetensors", "all classes", "demo-distill", 300, 8, 2, "4-6", 2.0, 0.96, 4e-5, 3.2e-4,
              25, 25, 0, "exclusive", "cpu", 0.5, 2, False, 0, 32, 32, 1]  # lora_rank, size: text families only


def link_widget(w: Workflow, src: int, slot: int, dst: int, name: str, type_: str) -> None:
    """Feed a widget from a link (the UI keeps the widget's value, unused, in widgets_values)."""
    w.nodes[dst - 1]["inputs"].append({"name": name, "type": type_, "widget": {"name": name}, "link": None})
    w.link(src, slot, dst, name)


def distill_demo_cpu() -> Workflow:
    w = Workflow("1.x-Distill: distil the demo teacher on a CPU, then sample the student next to the teacher")
    teacher = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    pos = w.node("XSlimDemoClass", ["Sneaker"])
    neg = w.node("XSlimDemoClass", ["unconditional"])
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 4])
    train = w.node("XSlimDistillTrain", DEMO_TRAIN, "1.x-Distill Train (returns at once; the job trains in the background)")
    status = w.node("XSlimDistillJobStatus", [True], "1.x-Distill Job Status (waits for the job)")
    w.link(train, 0, status, "job")
    plot, preview = w.node("PreviewImage", [], "loss curves"), w.node("PreviewImage", [], "latest training preview")
    w.link(status, 0, plot, "images")
    w.link(status, 1, preview, "images")
    student = w.node("XSlimStudentLoader", ["demo-distill.safetensors", "strict"])
    w.link(teacher, 0, student, "model")
    link_widget(w, status, 2, student, "student_name", "COMBO")
    fast = w.node("XSlimStudentKSampler", [0, "fixed"], "the student: 2 steps, 1.75 NFE")
    w.link(student, 0, fast, "model")
    w.link(pos, 0, fast, "positive")
    w.link(latent, 0, fast, "latent_image")
    slow = w.node("KSampler", [0, "fixed", 30, 2.0, "euler", "simple", 1.0], "the teacher: 30 steps, CFG 2 (60 NFE)")
    for name, src in (("model", teacher), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, slow, name)
    decoded = []
    for sampler in (slow, fast):
        dec = w.node("XSlimDemoDecode", [])
        w.link(sampler, 0, dec, "samples")
        decoded.append(dec)
    both = w.node("ImageBatch", [])
    w.link(decoded[0], 0, both, "image1")
    w.link(decoded[1], 0, both, "image2")
    save = w.node("SaveImage", ["xslim_distill_demo"], "teacher (first four) and student (last four)")
    w.link(both, 0, save, "images")
    return w


SD35_PROMPTS = ("a lighthouse on a cliff at dusk, oil painting\na bowl of ramen, studio photo\na red fox in fresh snow, "
                "35mm photo\nan isometric city block at night, neon")
# as DEMO_TRAIN, for SD3.5 Large on one GPU: 2000 iterations, batch 1, cached blocks 16..21 of 38
SD35_TRAIN = ["sd3.5_large.safetensors", SD35_PROMPTS, "sd35-large-1x", 2000, 1, 2, "16-21", 4.5, 0.96, 4e-5, 3.2e-4,
              100, 100, 0, "exclusive", "cuda:0", 0.5, 4, False, 32, 1024, 1024, 1]


def distill_sd35() -> Workflow:
    """SD3.5 Large: distil from a prompt list encoded with the checkpoint's CLIP (LoRA rank 32 on one shared
    bf16 base), then sample the student."""
    from build_workflows import about

    w = Workflow("1.x-Distill: distil SD3.5 Large from a prompt list, then sample the 1.x student")
    about(w, "Distils **SD3.5 Large** into a 2-step 1.x student in the background (the queue stays free), then "
             "samples it with the student nodes. The prompt list is encoded once with the checkpoint's CLIP and stored "
             "in the run folder; the worker loads `diffusion_models/sd3.5_large.safetensors` with ComfyUI's own loader "
             "and trains the student and the fake score as **LoRA adapters (rank 32) on one bf16 copy** of the base. "
             "The planner (docs/MEMORY.md) predicts 41 GiB per GPU for SD3.5 Large at 1024² with LoRA r64 and 18 GiB "
             "for SD3.5 Medium; a 24 GB card needs Medium, or Large with checkpointing and CPU optimizer states. Not run here: no GPU and no SD3.5 weights in CI; "
             "the same path is tested on the demo teacher's file (tests/host/test_distill_worker_comfy.py).")
    w.group("Load the base model", 0)
    ckpt = w.node("CheckpointLoaderSimple", ["sd3.5_large_fp8_scaled.safetensors"])
    shift = w.node("ModelSamplingSD3", [3.0])
    w.link(ckpt, 0, shift, "model")
    w.group("Distil in the background", 1)
    train = w.node("XSlimDistillTrain", SD35_TRAIN, "1.x-Distill Train (returns at once)")
    w.link(ckpt, 1, train, "clip")
    w.group("Wait for the job", 2)
    status = w.node("XSlimDistillJobStatus", [True], "1.x-Distill Job Status")
    w.link(train, 0, status, "job")
    plot = w.node("PreviewImage", [], "loss curves")
    w.link(status, 0, plot, "images")
    w.group("Sample the student", 3)
    student = w.node("XSlimStudentLoader", ["sd35-large-1x.safetensors", "trust (same weights, other precision)"])
    w.link(shift, 0, student, "model")
    link_widget(w, status, 2, student, "student_name", "COMBO")
    pos = w.node("CLIPTextEncode", ["a lighthouse on a cliff at dusk, oil painting"])
    w.link(ckpt, 1, pos, "clip")
    latent = w.node("EmptySD3LatentImage", [1024, 1024, 1])
    ks = w.node("XSlimStudentKSampler", [0, "randomize"], "the student: 2 steps, CFG 1")
    for name, src in (("model", student), ("positive", pos), ("latent_image", latent)):
        w.link(src, 0, ks, name)
    dec = w.node("VAEDecode", [])
    w.link(ks, 0, dec, "samples")
    w.link(ckpt, 2, dec, "vae")
    w.link(dec, 0, w.node("SaveImage", ["xslim_distill_sd35"]), "images")
    return w


WORKFLOWS = {"xslim_distill_demo_cpu": distill_demo_cpu, "xslim_distill_sd35": distill_sd35}

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    for name, build in WORKFLOWS.items():
        with open(os.path.join(here, f"{name}.json"), "w") as f:
            json.dump(build().to_json(), f, indent=1)
        print(f"wrote workflows/{name}.json")
