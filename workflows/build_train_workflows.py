"""Writes the 1.x-Distill training workflows (UI format, listed by ComfyUI's Templates browser).

    python workflows/build_train_workflows.py

* ``xslim_distill_demo_cpu.json``: distils the shipped demo teacher in the background for a few minutes on a CPU,
  shows the job as it stands (the Job Status node returns at once), and once the job is done a second queue samples
  the finished student next to the teacher.
The host tests check the file against a real ComfyUI's /object_info.
"""

from __future__ import annotations

from build_workflows import SOCKETS, Workflow, about, write_all

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

    w = Workflow("1.x-Distill: distil the demo teacher on a CPU, then sample the student next to the teacher",
                 "1.x-Distill of the shipped demo model on any CPU")
    about(w, "Distils the shipped **demo teacher** (Fashion-MNIST, HunyuanVideo architecture) into a 2-step 1.x "
             "student in a **background worker** (the queue stays free; the *1.x-Distill jobs* sidebar panel shows "
             "progress, loss curves and previews, and cancels or resumes). The first queue starts the job; *Job "
             "Status* returns at once, and *Load 1.x Student* stops that run saying how far the job is. When the panel "
             "shows the job done (about four minutes on two CPU cores), **queue again**: nothing is trained twice, and "
             "the finished student (`models/students/demo-distill.safetensors`) is sampled (1.75 network evaluations "
             "per image) next to the teacher at 30 steps with CFG 2 (60), in one grid labelled with each column's "
             "evaluations and time per image. *Job Status*'s `wait_for_finish` waits for "
             "the job instead, but then holds ComfyUI's queue for the whole training. No GPU, no downloads.")
    w.group("Load the demo teacher", 0)
    teacher = w.node("UNETLoader", ["demo_teacher.safetensors", "default"])
    w.group("Distil in the background", 1)
    train = w.node("XSlimDistillTrain", DEMO_TRAIN, "1.x-Distill Train (returns at once)")
    w.group("The job as it stands", 2)
    status = w.node("XSlimDistillJobStatus", [False], "1.x-Distill Job Status (returns at once)")
    w.link(train, 0, status, "job")
    plot, preview = w.node("PreviewImage", [], "loss curves"), w.node("PreviewImage", [], "latest training preview")
    w.link(status, 0, plot, "images")
    w.link(status, 1, preview, "images")
    w.group("Prompt", 0)
    pos = w.node("XSlimDemoClass", ["Sneaker"], "positive")
    neg = w.node("XSlimDemoClass", ["unconditional"], "negative")
    latent = w.node("EmptyHunyuanLatentVideo", [64, 64, 1, 4])
    w.group("The student next to its teacher", 3)
    student = w.node("XSlimStudentLoader", ["demo-distill.safetensors", "strict"])
    w.link(teacher, 0, student, "model")
    link_widget(w, status, 2, student, "student_name", "COMBO")
    # one labelled grid: a column per model, its name, network evaluations and time per image over it
    compare = w.node("XSlimStudentCompare", [0, "fixed", 30, 2.0, "euler", "simple", ""], "teacher (30 steps, CFG 2) vs student")
    for name, src in (("teacher", teacher), ("student", student), ("positive", pos), ("negative", neg), ("latent_image", latent)):
        w.link(src, 0, compare, name)
    save = w.node("SaveImage", ["xslim_distill_demo"], "teacher | student, labelled")
    w.link(compare, 0, save, "images")
    return w


SD35_PROMPTS = ("a lighthouse on a cliff at dusk, oil painting\na bowl of ramen, studio photo\na red fox in fresh snow, "
                "35mm photo\nan isometric city block at night, neon")
# as DEMO_TRAIN, for SD3.5 Large on one GPU: 2000 iterations, batch 1, cached blocks 16..21 of 38
SD35_TRAIN = ["sd3.5_large.safetensors", SD35_PROMPTS, "sd35-large-1x", 2000, 1, 2, "16-21", 4.5, 0.96, 4e-5, 3.2e-4,
              100, 100, 0, "exclusive", "cuda:0", 0.5, 4, False, 32, 1024, 1024, 1]


def distill_sd35() -> Workflow:
    """SD3.5 Large: distil from a prompt list encoded with the checkpoint's CLIP (LoRA rank 32 on one shared
    bf16 base), then sample the student."""

    w = Workflow("1.x-Distill: distil SD3.5 Large from a prompt list, then sample the 1.x student")
    about(w, "Distils **SD3.5 Large** into a 2-step 1.x student in the background (the queue stays free; the "
             "*1.x-Distill jobs* panel shows progress). Queue again once the job is done to sample the student with "
             "the student nodes (until then *Load 1.x Student* says how far the job is; *Job Status*'s "
             "`wait_for_finish` would hold ComfyUI's queue for the whole training). The prompt list is encoded once with the checkpoint's CLIP "
             "and stored in the run folder; the worker loads `diffusion_models/sd3.5_large.safetensors` with ComfyUI's own loader "
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
    w.group("The job as it stands", 2)
    status = w.node("XSlimDistillJobStatus", [False], "1.x-Distill Job Status (returns at once)")
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


WORKFLOWS = {"xslim_distill_demo_cpu.json": distill_demo_cpu, "xslim_distill_sd35.json": distill_sd35}
# The demo's card: the teacher's row and the shipped 1.75-NFE student's row of the demo distillation's evaluation
# grid (docs/distill/grid.png: 13 rows of 56 px in the results table's order, row 1 the teacher at 50 steps, row 12
# the 1.x student at 1.75 NFE; right of a 90 px label column, two 56 px samples per class), cut to the last four
# classes (shirt, sneaker, bag, ankle boot) so the samples stay large enough to see. The SD3.5 workflow gets the
# placeholder card that names the files it needs.
GRID_ROW, GRID_LEFT = 56, 90
SHOWN = (GRID_LEFT + 12 * GRID_ROW, GRID_LEFT + 20 * GRID_ROW)  # sample columns 13..20
THUMBNAILS = {"xslim_distill_demo_cpu.json": (
    "../docs/distill/grid.png", "what the demo distillation makes (docs/distill/grid.png)",
    [("teacher, 100 NFE", (SHOWN[0], 0, SHOWN[1], GRID_ROW)),
     ("1.x student, 1.75 NFE", (SHOWN[0], 11 * GRID_ROW, SHOWN[1], 12 * GRID_ROW))])}

if __name__ == "__main__":

    write_all(WORKFLOWS, THUMBNAILS)
