"""The pack's ComfyUI nodes (V3 schema). Each ``execute`` is a few lines over ``settings``, ``host`` and
``runner``, which hold the logic."""

from __future__ import annotations


import json
import logging
import os
import time
from functools import lru_cache, partial

from comfy_api.latest import io

from xslim_demo.teacher import CLASSES, classes_path, default_weights_path
from .host import XSlimSetupError, install
from .pictures import decision_map, labelled_grid, row_labels, table_image
from .runner import cached_run, decode, last_report, progress_bar, sample_latent
from .settings import CACHE_DEVICES, CACHE_DTYPES, PRESET_NAMES, make_settings, parse_setting_line, profile_names, save_profile

log = logging.getLogger("xslim")

CATEGORY = "X-Slim"


def _sampling_inputs(steps: int = 20, cfg: float = 4.0, steps_input: str = "steps", cfg_input: str = "cfg") -> list:
    """KSampler's sampling inputs, with its meaning in each tooltip (the runs these nodes make are KSampler's)."""
    import comfy.samplers

    return [
        io.Conditioning.Input("positive", tooltip="What to draw: the positive conditioning, as for KSampler."),
        io.Conditioning.Input("negative", tooltip="The negative conditioning (CFG), as for KSampler."),
        io.Latent.Input("latent_image", tooltip="The latent to sample from (its size and batch), as for KSampler."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="The noise seed; every run here uses the same one, so the images are comparable."),
        io.Int.Input(steps_input, default=steps, min=1, max=1000, tooltip="Sampling steps of the run(s)."),
        io.Float.Input(cfg_input, default=cfg, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="The CFG scale (1: no negative pass)."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler", tooltip="ComfyUI's sampler, as in KSampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple", tooltip="ComfyUI's noise schedule, as in KSampler."),
    ]


class XSlimCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimCache",
            display_name="X-Slim Cache",
            category=CATEGORY,
            description="Training-free caching for diffusion transformers (FLUX, SD3/SD3.5, HunyuanVideo): skips whole "
            "steps while the accumulated change is small, refreshes only the changing blocks between the two lines, "
            "computes fully past the critical line. Put it after the model loader (and LoRA / ModelSampling nodes).",
            inputs=[
                io.Model.Input("model", tooltip="The model to cache (after its loader and any LoRA / ModelSampling nodes)."),
                io.Combo.Input("preset", options=PRESET_NAMES, default="auto", tooltip=(
                    "slow: about 3.6x fewer block evaluations, quality first. fast: about 5x. auto: slow. custom: your "
                    "thresholds below. With a profile the presets hit these ratios on that model; without one the "
                    "online controller uses fixed lines.")),
                io.Combo.Input("profile", options=profile_names(), default=profile_names()[0], tooltip=(
                    "A profile recorded on this model with X-Slim Profile (a schedule made from one uncached run). "
                    "'none (online)': decide step by step from the predicted change.")),
                io.Float.Input("early_warning", default=0.1, min=0.0, max=10.0, step=0.01, tooltip=(
                    "custom only. Below this line whole steps are skipped. Online: predicted relative change of the "
                    "step residual; with a profile: multiple of the mean step change.")),
                io.Float.Input("critical", default=0.3, min=0.0, max=10.0, step=0.01, tooltip=(
                    "custom, online only. Past this line a step computes fully; between the lines only the changing "
                    "blocks are recomputed. Must not be below early_warning. 0 and 0 turn caching off.")),
                io.Float.Input("block_threshold", default=0.0, min=0.0, max=10.0, step=0.001, tooltip=(
                    "At a block refresh, blocks whose residual changed less than this are reused. 0: the median "
                    "change of each block stack (from the profile, or the last full step).")),
                io.Float.Input("token_ratio", default=0.5, min=0.05, max=1.0, step=0.05, tooltip=(
                    "custom only. At a token refresh, this fraction of the image tokens (those that changed most) is "
                    "recomputed; the rest keep their last output and attend with cached keys/values.")),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Caching acts from this point of the schedule... A percent means what it means in ComfyUI's core nodes "
                    "(EasyCache, ControlNet): it goes through the model's own sampling, shift included.")),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="...up to this one; outside, every step computes fully."),
                io.Combo.Input("cache_precision", options=list(CACHE_DTYPES), default="same as model", tooltip="fp16/bf16 halve the cache's memory."),
                io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default="same as model", tooltip="cpu keeps the cache off the GPU (slower)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with X-Slim; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, preset, profile, early_warning, critical, block_threshold, token_ratio, start_percent,
                end_percent, cache_precision, cache_device) -> io.NodeOutput:
        settings = make_settings(preset, profile, early_warning, critical, block_threshold, token_ratio, start_percent,
                                 end_percent, cache_precision, cache_device)
        return io.NodeOutput(install(model, settings))


class XSlimStats(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimStats",
            display_name="X-Slim Stats",
            category=CATEGORY,
            description="What X-Slim did in the last run of this model: a per-step decision map and a JSON summary.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of X-Slim Cache."),
                io.Latent.Input("samples", tooltip="The sampler's output, so this node runs after it."),
            ],
            outputs=[io.Image.Output(display_name="decision_map"),
                     io.String.Output(display_name="summary", tooltip="What happened, for people to read."),
                     io.String.Output(display_name="json", tooltip="The same numbers as JSON, for scripts.")],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        report = last_report(model)
        labels = row_labels(list(report.pattern_rows))
        info = {"summary": report.summary, **report.stats.as_dict(),
                "patterns": {labels[k]: p for k, p in report.pattern_rows.items()}}
        return io.NodeOutput(decision_map(report.pattern_rows, report.summary), readable_summary(report, labels),
                             json.dumps(info, indent=1))


def readable_summary(report, labels: dict) -> str:
    """A few lines a person reads: the log line, the saving, memory, and each row's decisions as letters."""
    stats = report.stats
    fewer = stats.num_steps / max(stats.effective_nfe, 1e-9)
    lines = [report.summary,
             f"{stats.num_steps} steps x {stats.num_blocks} blocks per pass: {fewer:.2f}x fewer block evaluations than uncached",
             f"cache memory at its peak: {stats.cache_bytes_peak / 2**20:.1f} MiB"]
    if getattr(report, "interrupted", False):
        lines.append("the run was interrupted: these numbers cover the steps that ran")
    lines.append("per row (F full, B block refresh, T token refresh, . skipped):")
    width = max((len(v) for v in labels.values()), default=0)
    lines += [f"  {labels[k]:<{width}}  {p}" for k, p in report.pattern_rows.items()]
    return "\n".join(lines)


class XSlimProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimProfile",
            display_name="X-Slim Profile",
            category=CATEGORY,
            description="Samples once without caching, records how much each step and block changes, and saves it as a "
            "profile in ComfyUI's user folder (xslim/profiles). X-Slim Cache can then select it.",
            inputs=[io.Model.Input("model", tooltip="The model to profile, WITHOUT X-Slim (it runs uncached once)."), *_sampling_inputs(),
                    io.String.Input("profile_name", default="my-model", tooltip="File name of the profile (letters, digits, . _ -).")],
            outputs=[io.Latent.Output(), io.String.Output(display_name="profile_path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, profile_name) -> io.NodeOutput:
        from xslim_core import XSlimConfig
        from .host import XSlimSettings, XSlimSetupError

        settings = XSlimSettings(XSlimConfig(mode="off"), record_profile=True)
        bar = progress_bar(steps)  # one update per sampling step
        out, _, report = cached_run(model, settings, lambda m: sample_latent(m, latent_image, seed, steps, cfg, sampler_name, scheduler,
                                                                             positive, negative, progress=bar.update_absolute))
        if report is None or report.profile is None:
            stats = report.stats if report is not None else None
            if stats is not None and not stats.one_call_per_step:
                raise XSlimSetupError(
                    f"X-Slim Profile: sampler {sampler_name!r} evaluates the model more than once per step "
                    f"({stats.uncached_calls} calls between steps, {stats.repeated_calls} repeated steps in this run), so "
                    "the change from step to step cannot be recorded. Profile with a sampler that makes one model call "
                    "per step (euler, euler_ancestral, dpmpp_2m, res_multistep, ddim, lcm); the profile "
                    "then serves any sampler."
                )
            raise XSlimSetupError(
                f"X-Slim Profile: the run did not visit every step of its schedule (sampler {sampler_name!r}). Profile "
                "with a one-evaluation-per-step sampler such as euler."
            )
        path = save_profile(report.profile, profile_name)
        return io.NodeOutput({"samples": out}, path)


DEFAULT_COMPARE = "uncached\nslow\nfast\ncustom warn=0.3 crit=0.6"


class XSlimCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimCompare",
            display_name="X-Slim Compare",
            category=CATEGORY,
            description="Samples the same seed uncached and with each setting, and returns one annotated grid: effective "
            "NFE, fewer block evaluations, time, and PSNR/SSIM against the uncached image.",
            inputs=[
                io.Model.Input("model", tooltip="The model WITHOUT X-Slim (the node adds it per setting)."),
                *_sampling_inputs(),
                io.String.Input("settings", multiline=True, default=DEFAULT_COMPARE, tooltip=(
                    "One setting per line: uncached | slow | fast | auto | custom warn=W crit=C, each optionally with "
                    "profile=NAME, block=THRESHOLD and ratio=TOKEN_RATIO.")),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the latents; without it the demo model's decoder or a latent preview is used."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="table")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, settings, vae=None) -> io.NodeOutput:
        lines = [line for line in settings.splitlines() if line.strip()]
        if len(lines) > MAX_COMPARE_SETTINGS:  # each line samples COMPARE_ROUNDS + 1 times, holding the queue
            raise XSlimSetupError(f"X-Slim Compare: {len(lines)} setting lines; at most {MAX_COMPARE_SETTINGS} are compared in "
                                  "one run (each samples the model up to four times while the queue waits). Split them "
                                  "over several Compare nodes or runs.")
        lines = [("uncached", None)] + [item for item in map(parse_setting_line, lines) if item[1] is not None]
        total = 1 + COMPARE_ROUNDS * len(lines)
        bar = progress_bar(total)  # one update per sampling run

        def sample(m):
            return sample_latent(m, latent_image, seed, steps, cfg, sampler_name, scheduler, positive, negative)

        cached_run(model, None, sample)  # warm-up (model load, kernels), not timed
        bar.update(1)
        firsts, times = interleaved_rounds([partial(cached_run, model, s, sample) for _, s in lines], lambda: bar.update(1))
        bar.update_absolute(total)  # long rounds are not repeated: the runs left out are not owed
        results = [(label, latent, report) for (label, _), (latent, report) in zip(lines, firsts)]
        columns = [decode(latent, vae) for _, latent, _ in results]  # each decoded once (a VAE is costly)
        return io.NodeOutput(*compare_outputs(results, times, columns, steps))


COMPARE_ROUNDS = 3  # each setting timed up to this often, interleaved, after one untimed warm-up run
MAX_COMPARE_SETTINGS = 12  # setting lines per Compare run: a grid people can read, and a bounded wait
COMPARE_REPEAT_BUDGET_S = 20.0
BUSY_SPREAD = 0.15  # spread above this fraction of the median: the machine was busy, say so


def interleaved_rounds(runs: list, tick=lambda: None) -> tuple[list, list[list[float]]]:
    """Times every run (a callable returning (latent, seconds, report)) up to COMPARE_ROUNDS times, interleaved so
    that a busy moment of the machine falls on all of them rather than one. Returns each run's (latent, report)
    from the first round (the same seed gives the same latent every round) and its seconds from every round."""
    firsts, times = [], [[] for _ in runs]
    for round_ in range(COMPARE_ROUNDS):
        started = time.perf_counter()
        for k, run in enumerate(runs):
            latent, seconds, report = run()
            times[k].append(seconds)
            if round_ == 0:
                firsts.append((latent, report))
            tick()
        # repeat only short rounds: a long one is stable already, and repeating it would make people wait
        if time.perf_counter() - started > COMPARE_REPEAT_BUDGET_S:
            break
    return firsts, times


def median_and_spread(values: list[float]) -> tuple[float, float]:
    import statistics

    kept = values
    median = statistics.median(kept)
    return median, ((max(kept) - min(kept)) / max(median, 1e-9) if len(kept) > 1 else float("nan"))


def busy_labels(labels: list[str], times: list[list[float]]) -> list[str]:
    """The runs whose repeats spread over ``BUSY_SPREAD`` of their median: the machine was busy while they ran."""
    return [label for label, t in zip(labels, times) if len(t) > 1 and median_and_spread(t)[1] > BUSY_SPREAD]


def timing_notes(labels: list[str], times: list[list[float]], fewer_blocks: list[float | None]) -> tuple[str, list[str]]:
    """(how the times were taken, warnings a person must see before reading the speed-up column). A warning when
    a setting was timed only once (no spread, so no way to tell a busy machine), when the spread of its repeats
    is over ``BUSY_SPREAD``, or when it came out slower than uncached although it evaluated fewer blocks."""
    runs = min(len(t) for t in times)
    method = (f"time: median of {runs} runs per setting, interleaved, after a warm-up run; spread = (max - min) / median"
              if runs > 1 else "time: one run per setting, after a warm-up run (a round took over "
              f"{COMPARE_REPEAT_BUDGET_S:.0f} s, so it was not repeated)")
    base = median_and_spread(times[0])[0]
    once = [label for label, t in zip(labels, times) if len(t) < 2]
    busy = busy_labels(labels, times)
    slower = [label for label, t, fewer in zip(labels, times, fewer_blocks)
              if fewer is not None and fewer > 1.0 and base / max(median_and_spread(t)[0], 1e-9) < 1.0]
    warnings = []
    if once:
        which = "" if len(once) == len(labels) else f" ({', '.join(once)})"
        warnings.append(f"Times are noisy: one run each{which}, so a busy machine cannot be told apart; the speed-ups "
                        "are indicative only.")
    if busy:
        warnings.append(f"The machine was busy (spread over {BUSY_SPREAD:.0%} for {', '.join(busy)}): times and "
                        "speed-ups are noisy.")
    if slower:
        warnings.append(f"Slower despite fewer blocks ({', '.join(slower)}): the machine was busy or overhead "
                        "dominates (a model this small spends little time in its blocks).")
    if warnings:
        warnings.append("Block evaluations and effective NFE are exact counts, whatever the timing.")
    return method, warnings


def aligned_text(header: list[str], rows: list[list[str]]) -> str:
    """A table as plain text in columns two spaces apart (first column left, numbers right): it reads the same in
    a preview box, a console and a log, where a pipe table wraps into noise."""
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]

    def line(r):
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def compare_outputs(results, times: list, columns, steps: int):
    """(grid IMAGE with the table under it, the table as aligned text with how it was timed and any warning)."""
    from xslim_lab.metrics import paired_fidelity

    reference = columns[0]
    base, _ = median_and_spread(times[0])
    header = ["setting", "effective NFE", "fewer blocks", "time s", "spread", "speed-up", "PSNR dB", "SSIM"]
    rows, labels, fewer_blocks = [], [], []
    for (label, _, report), images, timed in zip(results, columns, times):
        seconds, spread = median_and_spread(timed)
        spread_text = f"{spread:.0%}" if spread == spread else "one run"  # nan: timed once, no spread
        fid = paired_fidelity(images.permute(0, 3, 1, 2), reference.permute(0, 3, 1, 2))
        if report is None:  # the uncached reference: nothing to be "fewer" than
            nfe, fewer, psnr = f"{float(steps):.1f}", "reference", "reference"
            fewer_blocks.append(None)
            labels.append([label, f"NFE {steps} (reference)", f"{seconds:.2f}s ({spread_text})", "uncached reference", ""])
        else:
            nfe_v = report.stats.effective_nfe
            fewer_blocks.append(steps / max(nfe_v, 1e-9))
            nfe, fewer = f"{nfe_v:.1f}", f"{fewer_blocks[-1]:.2f}x"
            psnr = "identical" if fid["psnr"] >= 100 else f"{fid['psnr']:.1f}"
            labels.append([label, f"NFE {nfe} ({fewer} fewer)", f"{seconds:.2f}s ({base / seconds:.2f}x, {spread_text})",
                           f"PSNR {psnr} dB" if psnr != "identical" else "PSNR identical", f"SSIM {fid['ssim']:.3f}"])
        rows.append([label, nfe, fewer, f"{seconds:.2f}", spread_text, f"{base / seconds:.2f}x", psnr, f"{fid['ssim']:.3f}"])
    method, warnings = timing_notes([r[0] for r in rows], times, fewer_blocks)
    note = "\n".join([method] + warnings)
    grid = labelled_grid(columns, labels, table=table_image(header, rows, note))
    return grid, aligned_text(header, rows) + "\n\n" + note


class XSlimDemoClass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimDemoClass",
            display_name="X-Slim Demo Class",
            category=f"{CATEGORY}/demo",
            description="Conditioning for the shipped demo model (Fashion-MNIST, loads with UNETLoader as demo_teacher.safetensors).",
            inputs=[io.Combo.Input("class_name", options=CLASSES + ["unconditional"], default=CLASSES[0],
                                   tooltip="'unconditional' is the negative for classifier-free guidance.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, class_name) -> io.NodeOutput:
        from safetensors import safe_open

        index = (CLASSES + ["unconditional"]).index(class_name)
        with safe_open(classes_path(default_weights_path()), framework="pt") as f:
            context, pooled = f.get_tensor("context")[index : index + 1], f.get_tensor("pooled")[index : index + 1]
        return io.NodeOutput([[context, {"pooled_output": pooled}]])


class XSlimDemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimDemoDecode",
            display_name="X-Slim Demo Decode",
            category=f"{CATEGORY}/demo",
            description="The demo model's exact, weight-free decoder (pixel shuffle): latent -> 28x28 image.",
            inputs=[io.Latent.Input("samples", tooltip="A demo-model latent (from a sampler) to decode into images.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        from .pictures import demo_decode, is_demo_latent, is_demo_text_latent
        from .host import XSlimSetupError

        x = samples["samples"]
        if not (is_demo_latent(x) or is_demo_text_latent(x)):
            raise XSlimSetupError(
                "X-Slim Demo Decode: expected a demo model's latent: the class teacher's [B, 16, 1, 8, 8] "
                "(EmptyHunyuanLatentVideo 64x64, length 1) or the text teacher's [B, 16, 8, 8] (EmptySD3LatentImage "
                f"64x64), got {list(x.shape)}."
            )
        return io.NodeOutput(demo_decode(x))


@lru_cache(maxsize=1)
def _demo_text_teacher_encoder():
    """The shipped text encoder and its vocabulary, read once (a few hundred kB)."""
    from xslim_demo.text_teacher import load_text_encoder

    return load_text_encoder()


class XSlimDemoText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="XSlimDemoText",
            display_name="X-Slim Demo Text Encode",
            category=f"{CATEGORY}/demo",
            description=(
                "Conditioning for the shipped text demo model (SD3-shaped, Fashion-MNIST; loads with UNETLoader as "
                "demo_text_teacher.safetensors) from a prompt such as 'a sneaker', encoded by its own small text "
                "encoder. An empty prompt is the unconditional one (the negative for CFG)."
            ),
            inputs=[io.String.Input("prompt", default="a sneaker",
                                    tooltip="Words it knows: the ten Fashion-MNIST garments and their usual names "
                                            "(t-shirt, trousers, pullover, dress, coat, sandal, shirt, sneaker, bag, "
                                            "ankle boot, ...); other words are read as unknown.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, prompt) -> io.NodeOutput:
        import torch

        from xslim_demo.text_teacher import tokenize

        encoder, vocab = _demo_text_teacher_encoder()
        with torch.no_grad():
            context, pooled = encoder(tokenize([prompt], vocab))
        return io.NodeOutput([[context, {"pooled_output": pooled}]])


NODES = [XSlimCache, XSlimStats, XSlimProfile, XSlimCompare, XSlimDemoClass, XSlimDemoDecode, XSlimDemoText]


# The folder the pack adds to diffusion_models. It holds only links to the demo teachers: ComfyUI lists every
# .safetensors file under a model folder, and the class table, the text encoder and the demo classifier (next to
# them in xslim_demo/weights, where the training code and the command line expect them) are not models.
LISTED_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".comfyui_models", "diffusion_models")


def _demo_teachers() -> list[str]:
    from xslim_demo.text_teacher import default_weights_path as text_teacher_path

    return [p for p in (default_weights_path(), text_teacher_path()) if os.path.exists(p)]


def _link_teacher(folder: str, teacher: str) -> bool:
    """Put ``teacher`` in ``folder`` as a hard link (no extra disk), else a symbolic link, else a copy."""
    import shutil

    listed = os.path.join(folder, os.path.basename(teacher))
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(listed) and os.path.samefile(listed, teacher):
            return True
        if os.path.lexists(listed):  # an older teacher (the pack was updated): link the current one
            os.remove(listed)
        for make in (os.link, os.symlink, shutil.copyfile):
            try:
                make(teacher, listed)
                return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def register_demo_model_folder() -> None:
    """Make the shipped demo models visible to UNETLoader, and nothing else of the pack (models/diffusion_models
    stays untouched)."""
    import folder_paths

    if all([_link_teacher(LISTED_FOLDER, teacher) for teacher in _demo_teachers()]):
        folder_paths.add_model_folder_path("diffusion_models", LISTED_FOLDER)
        return
    # a read-only install: list the weights folder itself, auxiliary files included, rather than no demo model
    log.warning("X-Slim: could not write %s (read-only install?); UNETLoader also lists the demo models' class table, "
                "text encoder and classifier, which are not models: pick demo_teacher.safetensors or "
                "demo_text_teacher.safetensors.", LISTED_FOLDER)
    folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(default_weights_path()))


__all__ = ["NODES", "register_demo_model_folder"]
