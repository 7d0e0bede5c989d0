"""The 1.x-step student nodes (V3 schema): load a student onto its base model, its sigmas and sampler for
SamplerCustomAdvanced, a one-node KSampler, and a side-by-side comparison with the teacher."""

from __future__ import annotations

import os
import time

import torch
from comfy_api.latest import io

from .host import XSlimSettings, XSlimSetupError, install
from .pictures import labelled_grid
from .runner import decode, progress_bar, sample_latent
from .settings import parse_setting_line
from .student import BASE_CHECKS, load_student_model, register_students_folder, student_names, student_settings
from .student_sampling import demo_class_accuracy, run_student, student_sampler
from .xslim_nodes import BUSY_SPREAD, COMPARE_ROUNDS, aligned_text, busy_labels, interleaved_rounds, median_and_spread

CATEGORY = "X-Slim/1.x student"
NEGATIVE_TOOLTIP = ("Ignored: the student was distilled with guidance built in and samples at CFG 1, so it never "
                    "evaluates a negative prompt. Accepted so existing graphs can be rewired without changes.")


def _default_student() -> str | None:
    """The first student listed: a combo without a default shows as 'undefined' in the node library's preview."""
    names = student_names()
    return names[0] if names else None


class LoadStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimStudentLoader",
            display_name="Load 1.x Student",
            category=CATEGORY,
            description="Applies a 1.x-Distill student (from models/students) to its base model: the student's weights "
            "as weight patches (LoRAs loaded before stay applied) and its cached second step with the learned "
            "compensation. The base model is checked first; the input model is not modified.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the student was distilled from (after any LoRA nodes)."),
                io.Combo.Input("student_name", options=student_names(), default=_default_student(), tooltip=(
                    "A student file from models/students (the shipped demo students are listed too), or, linked from "
                    "1.x-Distill Job Status, the student of that job once it is done.")),
                io.Combo.Input("base_check", options=BASE_CHECKS, default=BASE_CHECKS[0], tooltip=(
                    "strict: the model must hold the weights the student was distilled from (fp32/fp16/bf16 copies pass). "
                    "trust: skip the weights check, for a base you know is the same weights quantised (fp8) or converted. "
                    "Family, blocks and shapes are always checked.")),
            ],
            outputs=[io.Model.Output(tooltip="The student. Sample it with 1.x Student KSampler, or 1.x Student Sampler + Sigmas.")],
        )

    @classmethod
    def execute(cls, model, student_name, base_check) -> io.NodeOutput:
        import folder_paths

        register_students_folder()
        path = folder_paths.get_full_path("students", student_name) if student_name else None
        if path is None:
            path, student_name = student_of_job(student_name)
        student, header = load_student_model(model, path, base_check)
        return io.NodeOutput(student, ui={"text": [f"{student_name}: {header.describe()}"]})


SUFFIX = ".safetensors"


def student_of_job(name: str) -> tuple[str, str]:
    """(path, file name) of the finished student of the 1.x-Distill job ``name`` (a run name, or the student file
    name it exports to), which is what Job Status hands on. Anything else is refused in one sentence that says
    what to do, without folder paths: an empty name, a name that is no student and no job, a job that is not done."""
    import folder_paths

    from .jobs import JobError, check_run_name, manager

    where = "Load 1.x Student"
    run = name[: -len(SUFFIX)] if isinstance(name, str) and name.endswith(SUFFIX) else name
    if not run:
        raise XSlimSetupError(f"{where}: no student is chosen (the name is empty); pick one from the list of students, "
                              "or connect 1.x-Distill Job Status's student_name.")
    try:
        jobs = manager()
        job = jobs.job(check_run_name(run))
    except JobError:
        raise XSlimSetupError(f"{where}: there is no student {name!r} in models/students and no 1.x-Distill job of "
                              "that name; pick a student from the list, or train one with 1.x-Distill Train.") from None
    summary = jobs.present(job)  # settled: a finished job's student is exported here if the monitor has not yet
    state, done = summary["state"], f"iteration {summary['iteration']} of {summary['iterations']}"
    if summary["student"]:
        path = folder_paths.get_full_path("students", summary["student"])
        if path is not None:
            return path, summary["student"]
    what = {
        "starting": f"is starting and has no student yet; wait until the jobs panel shows it done ({done} so far), "
                    "then queue again, or pick another student",
        "running": f"is still training ({done}); wait until the jobs panel shows it done, then queue again (the "
                   "queue stays free meanwhile), or pick another student",
        "stopping": f"is stopping at {done} and has no finished student; Resume it in the 1.x-Distill jobs panel and "
                    "queue again when it is done, or pick another student",
        "stopped": f"was stopped at {done}, so it has no finished student; Resume it in the 1.x-Distill jobs panel and "
                   "queue again when it is done, or pick another student",
        "interrupted": f"was interrupted at {done}, so it has no finished student; Resume it in the 1.x-Distill jobs "
                       "panel and queue again when it is done, or pick another student",
        "failed": f"failed at {done}, so it has no finished student; read why in the 1.x-Distill jobs panel, Resume "
                  "it there once the cause is fixed, or pick another student",
    }.get(state, f"is {state} and has no student to load; look at it in the 1.x-Distill jobs panel, or pick "
                 "another student")
    raise XSlimSetupError(f"{where}: 1.x-Distill job {run!r} {what}.")


class StudentSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimStudentSigmas",
            display_name="1.x Student Sigmas",
            category=CATEGORY,
            description="The noise levels the student was distilled for, read from its file (its shift is already applied).",
            inputs=[io.Model.Input("model", tooltip="The MODEL output of Load 1.x Student.")],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(torch.tensor(student_settings(model).header.sigmas, dtype=torch.float32))


class StudentSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimStudentSampler",
            display_name="1.x Student Sampler",
            category=CATEGORY,
            description="The student's deterministic Euler sampler (as in training), for SamplerCustomAdvanced with CFG 1 "
            "(BasicGuider, or CFGGuider at cfg 1; another CFG is refused) and 1.x Student Sigmas (a single sigma is "
            "refused; empty sigmas never reach a sampler: SamplerCustomAdvanced then returns the latent unchanged). "
            "The cached second step needs no setting: the student model carries it.",
            inputs=[],
            outputs=[io.Sampler.Output(tooltip=(
                "Connect to SamplerCustomAdvanced with BasicGuider (or CFGGuider at cfg 1) and 1.x Student Sigmas. Empty "
                "sigmas skip sampling altogether (ComfyUI returns the latent as it is); one sigma or a CFG other than 1 "
                "stops the run with a message."))],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(student_sampler())


class StudentKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimStudentKSampler",
            display_name="1.x Student KSampler",
            category=CATEGORY,
            description="Samples a 1.x student in one node: its own sigmas, Euler, CFG 1, the cached second step.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Load 1.x Student."),
                io.Conditioning.Input("positive", tooltip="What to draw: the positive conditioning (the student samples at CFG 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to sample from (its size and batch), as for KSampler."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed (KSampler's noise for the same seed)."),
                io.Conditioning.Input("negative", optional=True, tooltip=NEGATIVE_TOOLTIP),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, negative=None) -> io.NodeOutput:
        return io.NodeOutput({"samples": run_student(model, positive, latent_image, seed)})


DEFAULT_XSLIM = "fast"


def no_progress(step, total) -> None:
    pass


def load_untimed(model) -> None:
    """Loads the model a column is about to sample before its clock starts. Columns share one base model, so
    ComfyUI applies or removes a student's weight patches whenever the sampled model changes: in an interleaved
    comparison that would fall on every timed run (about 4 ms per image on the CPU demo, half a student's time),
    while a graph that samples a student pays it once per load. Without ComfyUI's loader the run loads as usual."""
    import comfy.model_management

    load = getattr(comfy.model_management, "load_models_gpu", None)
    if load is not None:
        load([model])


class StudentCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="XSlimStudentCompare",
            display_name="1.x Student Compare",
            category=CATEGORY,
            description="The same seed from the teacher at N steps, the teacher with X-Slim, and the student, in one "
            "annotated grid: network evaluations per image (counted, CFG included), time per image (every column warmed up "
            "once, then the median of up to 3 interleaved runs), and for the demo "
            "model the classifier's accuracy on the prompted class. PSNR against the teacher is not shown: a distilled "
            "student draws its own sample, so pixel distance would mislead.",
            inputs=[
                io.Model.Input("teacher", tooltip="The base model WITHOUT X-Slim or a student."),
                io.Model.Input("student", tooltip="The MODEL output of Load 1.x Student (on the same base)."),
                io.Model.Input("student_2", optional=True, tooltip="A second student of the same base (e.g. another cached range), as one more column."),
                io.Conditioning.Input("positive", tooltip="What to draw: the positive conditioning, for every column."),
                io.Conditioning.Input("negative", tooltip="The teacher's negative (CFG); the student ignores it."),
                io.Latent.Input("latent_image", tooltip="The latent to sample from (its size and batch), for every column."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed; every column uses the same one, so the images are comparable."),
                io.Int.Input("teacher_steps", default=50, min=1, max=1000, tooltip="Sampling steps of the teacher's columns."),
                io.Float.Input("teacher_cfg", default=2.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The teacher's CFG scale (the student always samples at CFG 1)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="The teacher's sampler, as in KSampler (the student uses its own Euler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="The teacher's noise schedule, as in KSampler (the student uses its own sigmas)."),
                io.String.Input("xslim", default=DEFAULT_XSLIM, tooltip=(
                    "The teacher-with-X-Slim column, one X-Slim Compare setting line (slow, fast, custom warn=.. crit=.., "
                    "profile=NAME); empty for none.")),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the latents; without it the demo model's decoder or a latent preview is used."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="table")],
        )

    @classmethod
    def execute(cls, teacher, student, positive, negative, latent_image, seed, teacher_steps, teacher_cfg,
                sampler_name, scheduler, xslim, student_2=None, vae=None) -> io.NodeOutput:
        from xslim_core import XSlimConfig

        students = [student] + ([student_2] if student_2 is not None else [])
        for s in students:
            student_settings(s)  # a clear message when a student input is not a student
        batch = latent_image["samples"].shape[0]
        columns = [(f"teacher {teacher_steps} steps, CFG {teacher_cfg:g}", XSlimSettings(XSlimConfig(mode="off")))]
        if xslim.strip():
            label, settings = parse_setting_line(xslim)
            if settings is not None:
                columns.append((f"teacher + X-Slim {label}", settings))

        def teacher_run(m):
            return sample_latent(m, latent_image, seed, teacher_steps, teacher_cfg, sampler_name, scheduler, positive, negative)

        def teacher_column(settings):  # X-Slim mode "off" only counts the evaluations
            def run():
                patched = install(teacher, settings)
                load_untimed(patched)
                start = time.perf_counter()
                latent = teacher_run(patched)
                return latent, time.perf_counter() - start, settings.reports[-1].stats
            return run

        def student_column(s):
            def run():
                load_untimed(s)
                start = time.perf_counter()
                latent = run_student(s, positive, latent_image, seed, progress=no_progress)  # the Compare's bar counts runs
                return latent, time.perf_counter() - start, student_settings(s).reports[-1].stats
            return run

        runs = [(label, teacher_column(settings)) for label, settings in columns]
        runs += [(f"1.x student {os.path.splitext(student_settings(s).name)[0]}", student_column(s)) for s in students]
        total = len(runs) * (1 + COMPARE_ROUNDS)
        bar = progress_bar(total)  # one update per sampling run
        # every column alike, as X-Slim Compare times its settings: one untimed warm-up each (model load, the
        # student's weight patches, kernels), then up to COMPARE_ROUNDS timed rounds, interleaved so that a busy
        # moment of the machine falls on all columns rather than one; the median is reported
        for _, run in runs:
            run()
            bar.update(1)
        firsts, times = interleaved_rounds([run for _, run in runs], lambda: bar.update(1))
        bar.update_absolute(total)  # long rounds are not repeated: the runs left out are not owed
        results = [(label, latent, stats) for (label, _), (latent, stats) in zip(runs, firsts)]
        images = [decode(latent, vae) for _, latent, _ in results]
        accuracy = demo_class_accuracy(images, latent_image["samples"], positive)
        timed = len(times[0])
        header = ["column", "NFE per image", f"ms per image (median of {timed})", "spread", "class accuracy"]
        labels, rows = [], []
        for k, ((label, _, stats), timed_runs) in enumerate(zip(results, times)):
            nfe = stats.block_evals / max(1, stats.num_blocks) / batch
            seconds, spread = median_and_spread(timed_runs)
            ms = 1000 * seconds / batch
            spread_cell = f"{spread:.0%}" if spread == spread else "-"  # nan: one timed run, no spread
            acc = "" if accuracy is None else f"{accuracy[k][0]}/{accuracy[k][1]}"
            labels.append([label, f"NFE {nfe:.2f} per image", f"{ms:.2f} ms per image"] + ([f"class accuracy {acc}"] if acc else []))
            rows.append([label, f"{nfe:.2f}", f"{ms:.2f}", spread_cell, acc or "n/a"])
        notes = [(f"time: median of {timed} runs per column, interleaved, after one untimed warm-up run of each column; "
                  "spread = (max - min) / median") if timed > 1 else
                 "time: one run per column after one untimed warm-up run of each (a round is long): no spread measured"]
        busy = busy_labels([label for label, _, _ in results], times)
        if busy:
            notes.append(f"The machine was busy (spread over {BUSY_SPREAD:.0%} for {', '.join(busy)}): times are noisy; "
                         "network evaluations are exact.")
        table = aligned_text(header, rows) + "\n\n" + "\n".join(notes)
        return io.NodeOutput(labelled_grid(images, labels), table)


NODES = [LoadStudent, StudentSigmas, StudentSampler, StudentKSampler, StudentCompare]

__all__ = ["NODES"]
