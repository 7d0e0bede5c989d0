"""X-Slim inside ComfyUI, through public seams only.

* ``OUTER_SAMPLE`` wrapper: one engine per sampling run (like core EasyCache), built from the diffusion
  model the guider holds at that moment, so nothing keeps a model alive between runs; the log line and the
  run's statistics come out here, also when the run is interrupted.
* ``APPLY_MODEL`` wrapper: one model call; the engine plans per batch row, a row being one sample of one
  cond entry (keyed by ComfyUI's per-cond ``uuids``), so CFG batched or split gives the same decisions.
* ``patches_replace["dit"]`` on every block: skip, reuse a cached residual, or run the block (through any
  ``dit`` patch that was there before ours).

ComfyUI modules are imported inside functions only, when ComfyUI calls us.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from xslim_core import Profile, XSlimConfig, XSlimEngine, check_profile
from xslim_core.adapters.base import merge_rows, take_rows
from xslim_core.state import RunStats
from xslim_core.tokens import IMG_FIRST, TXT_FIRST
from .families import ComfyFamily, family_for, supported_families

KEY = "xslim"  # wrapper key and transformer_options entry of the settings
RUN = "xslim_run"  # transformer_options entry of the current run's engine
BRANCHES = {0: "cond", 1: "uncond"}
log = logging.getLogger("xslim")


class XSlimSetupError(ValueError):
    """Bad settings or an unsupported model: raised while the node executes, so ComfyUI shows it."""

    # ComfyUI names an error by its class's module, which for a custom node pack is the folder's absolute path; the
    # frontend shows that name next to the message ("/home/.../custom_nodes/comfyui-xslim.nodes.host.XSlim..."), so
    # the pack's errors carry a short module name instead
    __module__ = "comfyui_xslim"


@dataclass
class RunReport:
    summary: str
    stats: RunStats
    pattern_rows: dict  # row key -> letters
    sigmas: list
    profile: Profile | None = None
    planned: str | None = None  # schedule mode: the planned decision letters and block evaluations per row
    predicted_block_evals: float | None = None
    interrupted: bool = False


@dataclass
class XSlimSettings:
    """What the cache node decided; lives in the patched model's transformer_options."""

    config: XSlimConfig
    profile: Profile | None = None
    record_profile: bool = False
    reports: list = field(default_factory=list)  # RunReport per finished run, newest last (kept short)
    segment_transform: object = None  # segment mode (a 1.x student): the compensation of the reused blocks
    role = "an X-Slim cache"  # what the node that made these settings does, for messages

    def engine_for(self, diffusion_model, sigmas: list[float] | None = None, model_sampling=None, token_level: bool = True) -> XSlimEngine:
        family = family_for(diffusion_model)
        if family is None:
            raise XSlimSetupError(unsupported_message(diffusion_model))
        token = family.token_level and token_level
        config = self.config if token else self.config.with_(levels=self.config.levels - {"token"})
        if sigmas is not None:
            config = comfy_percent_window(config, model_sampling, sigmas)
        return XSlimEngine(
            family, family.specs(diffusion_model), family.stack_sizes(diffusion_model), config, self.profile,
            record_profile=self.record_profile, model_name=type(diffusion_model).__name__, attention_seam="host",
            segment_transform=self.segment_transform, allocation_guard=malloc_graph_pause(),
        )

    def summary(self, stats: RunStats) -> str:
        return stats.summary()

    def add_report(self, report: RunReport) -> None:
        self.reports = (self.reports + [report])[-8:]


def malloc_graph_pause():
    """ComfyUI's pause of its per-block allocation recording (``comfy.model_prefetch.pause_malloc_graph``, newer
    ComfyUI with the Comfy Compiler / dynamic VRAM), or None where this ComfyUI has none. Cache state that outlives
    a block is allocated under it; recorded allocations that outlive their block abort the process."""
    try:
        import comfy.model_prefetch as prefetch
    except ImportError:
        return None
    return getattr(prefetch, "pause_malloc_graph", None)


def comfy_percent_window(config: XSlimConfig, model_sampling, sigmas: list[float]) -> XSlimConfig:
    """ComfyUI's meaning of start/end percent, as in its core nodes (EasyCache, LazyCache): a percent becomes a
    sigma through the model's own ``percent_to_sigma`` (so the model's shift applies), and a step may cache where
    ``end sigma < sigma <= start sigma``, compared in the sigmas' float32 as EasyCache compares them. The engine
    counts progress as 1 - sigma / sigma_0, so the window is handed to it as fractions that fall between the
    run's steps."""
    if (config.start_percent, config.end_percent) == (0.0, 1.0) or not hasattr(model_sampling, "percent_to_sigma"):
        return config
    steps = torch.tensor(sigmas[:-1], dtype=torch.float32)
    inside = ((steps <= float(model_sampling.percent_to_sigma(config.start_percent)))
              & (steps > float(model_sampling.percent_to_sigma(config.end_percent)))).tolist()
    if not any(inside):
        log.warning("X-Slim: start/end percent %s..%s select no step of this run; it runs uncached.", config.start_percent, config.end_percent)
        return config.with_(mode="off", segment=None)
    top = max(float(sigmas[0]), 1e-12)
    progress = [1.0 - float(s) / top for s in sigmas[:-1]]
    first, last = inside.index(True), len(inside) - 1 - inside[::-1].index(True)
    start = (progress[first - 1] + progress[first]) / 2 if first > 0 else 0.0
    end = (progress[last] + progress[last + 1]) / 2 if last + 1 < len(progress) else 1.0
    return config.with_(start_percent=start, end_percent=end)


def unsupported_message(diffusion_model) -> str:
    return (
        f"X-Slim does not support {type(diffusion_model).__name__} models yet. Supported: {supported_families()}. "
        "Remove the X-Slim node for this model; the rest of the graph works without it."
    )


def check_model(model_patcher, settings: XSlimSettings) -> ComfyFamily:
    """Validate the model and the profile against it while the node runs (errors reach ComfyUI's dialog)."""
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    family = family_for(diffusion_model)
    if family is None:
        raise XSlimSetupError(unsupported_message(diffusion_model))
    try:
        check_profile(settings.profile, family, family.stack_sizes(diffusion_model))
    except ValueError as e:
        raise XSlimSetupError(f"{e} (choose another profile, or 'none' for online mode)") from None
    return family


def install(model_patcher, settings: XSlimSettings):
    """A clone of ``model_patcher`` with X-Slim's wrappers and block patches; the input model is untouched."""
    from comfy.patcher_extension import WrappersMP

    family = check_model(model_patcher, settings)
    previous = model_patcher.model_options.get("transformer_options", {}).get(KEY)
    if previous is not None and previous.role != settings.role:
        raise XSlimSetupError(
            f"This model already carries {previous.role}; it cannot also take {settings.role}. A 1.x student "
            "already reuses blocks at its cached step: use either the student or X-Slim Cache on the base model."
        )
    m = model_patcher.clone()
    m.model_options.setdefault("transformer_options", {})[KEY] = settings
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, apply_model_wrapper)
    options = m.model_options["transformer_options"]
    options["optimized_attention_override"] = attention_override(options.get("optimized_attention_override"))
    existing = m.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
    for spec in family.specs(model_patcher.get_model_object("diffusion_model")):
        kind, index = spec.patch
        m.set_model_patch_replace(block_patch(spec, existing.get(spec.patch)), "dit", kind, index)
    return m


def block_patch(spec, previous):
    """The ``dit`` patch of one block; ``previous`` is a patch that was there before ours (it keeps running)."""

    def patch(args: dict, extra: dict):
        def run_block(a):
            return previous(a, extra) if previous is not None else extra["original_block"](a)

        options = args.get("transformer_options") or {}
        engine = options.get(RUN)
        if engine is None:
            return run_block(args)
        check_image_slice(spec, options.get("img_slice"))
        ctx = engine.current_call
        if ctx is not None:
            ctx.expect_attention(spec)
        return engine.block_call(spec, run_block, (args,), {})

    patch.xslim_block = spec.patch
    return patch


def check_image_slice(spec, image_slice) -> None:
    """Where the host says the image tokens are (``transformer_options["img_slice"]``, set by newer ComfyUI for
    single-stream blocks) must agree with the layout read off the model: a disagreement would refresh text rows
    as image tokens, so the run stops with the cause instead of drawing a wrong picture."""
    if image_slice is None or spec.layout not in (IMG_FIRST, TXT_FIRST):
        return
    if (image_slice[0] == 0) != (spec.layout == IMG_FIRST):
        raise XSlimSetupError(f"X-Slim: this ComfyUI puts the image tokens of block {spec.patch} at {list(image_slice)}, "
                              f"but X-Slim read the order {spec.layout!r} off the model. This ComfyUI version changed the "
                              "model's token order: update comfyui-xslim, or bypass the X-Slim node for this model.")


ATTENTION_ARGS = ("heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def attention_override(previous):
    """ComfyUI's attention override: hands the attention calls of a block that X-Slim watches (token refresh,
    K/V capture) to the engine as [B, heads, N, head_dim] tensors; any earlier override keeps running."""

    def override(func, *args, **kwargs):
        def attention(*a, **k):
            return previous(func, *a, **k) if previous is not None else func(*a, **k)

        engine = (kwargs.get("transformer_options") or {}).get(RUN)
        ctx = engine.current_call if engine is not None else None
        if ctx is None or not ctx.expects_attention:
            return attention(*args, **kwargs)
        q, k, v = args[:3]
        named = {**dict(zip(ATTENTION_ARGS, args[3:])), **kwargs}
        heads, mask = named.pop("heads"), named.pop("mask", None)
        if not named.pop("skip_reshape", False):  # [B, N, heads * head_dim] -> [B, heads, N, head_dim]
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        return ctx.attend_next(lambda q_, k_, v_, m_=None: attention(q_, k_, v_, heads, mask=m_, skip_reshape=True, **named), q, k, v, mask)

    override.xslim_attention = True  # lets a run see whether a node after X-Slim replaced it
    return override


def _patches_intact(model_options: dict, engine: XSlimEngine) -> bool:
    dit = model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return all(getattr(dit.get(spec.patch), "xslim_block", None) == spec.patch for spec in engine.blocks)


def outer_sample_wrapper(executor, *args, **kwargs):
    """One sampling run: a fresh engine, its schedule from the run's sigmas, a log line at the end."""
    import comfy.model_patcher

    guider = executor.class_obj
    original_options = guider.model_options
    settings: XSlimSettings = original_options["transformer_options"][KEY]
    sigmas = [float(s) for s in args[3]]
    override = original_options.get("transformer_options", {}).get("optimized_attention_override")
    token_level = getattr(override, "xslim_attention", False)
    if not token_level and "token" in settings.config.levels and settings.config.mode != "off":
        log.warning("X-Slim: a node after X-Slim replaced the attention override; this run skips the token level. Put X-Slim last.")
    engine = settings.engine_for(guider.model_patcher.model.diffusion_model, sigmas, guider.model_patcher.get_model_object("model_sampling"),
                                 token_level=token_level)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    if not _patches_intact(guider.model_options, engine):
        log.warning("X-Slim: another node replaced some of X-Slim's block patches after the X-Slim node; this run is uncached. Put X-Slim last.")
        return executor(*args, **kwargs)
    guider.model_options["transformer_options"][RUN] = engine
    finished, schedule = False, None
    try:
        with engine.run(sigmas):
            out = executor(*args, **kwargs)
            finished, schedule = True, engine.schedule
        return out
    finally:
        guider.model_options = original_options
        stats = engine.stats
        summary = settings.summary(stats) + ("" if finished else " (run interrupted)")
        log.info(summary)  # once: ComfyUI's logging prints INFO to the console, where its users look
        settings.add_report(RunReport(
            summary, stats, {r: stats.pattern(r) for r in stats.decisions}, sigmas,
            profile=_recorded(engine) if settings.record_profile and finished else None,
            planned=schedule.pattern if schedule else None,
            predicted_block_evals=schedule.predicted_block_evals if schedule else None,
            interrupted=not finished,
        ))


def _recorded(engine: XSlimEngine) -> Profile | None:
    try:
        return engine.recorded_profile
    except RuntimeError:  # the sampler evaluated between steps: no complete profile
        return None


class ComfyModelCall:
    """One ``apply_model`` call as the engine sees it: sigma, rows and their keys, per-row argument slices."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs
        x = args[0]
        self.batch = x.shape[0]
        self.options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        sigmas = self.options.get("sigmas")
        t = sigmas if sigmas is not None else args[1]
        self.sigma = float(t.reshape(-1)[0])
        self.time_resolution = torch.finfo(t.dtype).eps if t.is_floating_point() else 0.0
        self.shape_key = (tuple(x.shape[1:]), x.dtype)  # cond and uncond may differ in text length: not keyed
        uuids = self.options.get("uuids") or [None]
        branches = self.options.get("cond_or_uncond") or [0] * len(uuids)
        per = max(1, self.batch // len(uuids))
        chunk = [min(r // per, len(uuids) - 1) for r in range(self.batch)]
        # (CFG branch, cond entry, sample): ComfyUI may batch or split cond and uncond; the keys stay the same
        self.keys = [(BRANCHES.get(branches[c], "cond"), str(uuids[c]), r % per) for r, c in zip(range(self.batch), chunk)]

    def args_for(self, rows: list[int]) -> tuple[tuple, dict]:
        if rows == list(range(self.batch)):
            return self.args, self.kwargs
        index = torch.tensor(rows)
        return (tuple(take_rows(a, index, self.batch) for a in self.args),
                {k: take_rows(v, index, self.batch) for k, v in self.kwargs.items()})

    merge = staticmethod(merge_rows)


def apply_model_wrapper(executor, *args, **kwargs):
    call = ComfyModelCall(args, kwargs)
    engine = call.options.get(RUN)
    if engine is None:
        return executor(*args, **kwargs)
    if (args[4] if len(args) > 4 else kwargs.get("control")) is not None:
        engine.warn_once("X-Slim: ControlNet adds to the blocks' outputs; steps with a ControlNet run uncached.")
        return engine.run_uncached(call, executor)
    return engine.dispatch(call, executor)
