"""The X-Slim engine, host-agnostic: runs, per-row plans and the block protocol.

One model call goes: the host hands it to ``dispatch``, which finds the step from sigma and asks the
controller for a plan per batch row; rows with the same plan run together (usually the whole batch in one
call). Inside the call the host hands each block call to ``block_call``, and ``call_context`` carries out
the plan. Embeddings and the final layer always run, as the model's own forward does them.

The pieces: ``protocols`` (what the engine calls on blocks, model calls and controllers), ``run`` (one
sampling run's state), ``call_context`` (one model call), ``forecast`` (a skipped step's residual),
``diffusers_host`` (the diffusers forward hooks); ComfyUI's host is ``nodes/host.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Callable, Iterable, Sequence

from .adapters import Adapter
from .call_context import CallContext
from .config import StepKind, StepPlan, XSlimConfig
from .profile import Profile, check_fields
from .protocols import AttentionSeam, EngineBlock, EngineModelCall
from .run import UNSET, Run, ThreadState, check_sigmas, locate_step
from .schedule import BlockSelector
from .state import RunStats, TensorStore


class XSlimEngine:
    """The host-agnostic engine: runs, per-row plans and the block protocol. A host (``diffusers_host``, the
    ComfyUI layer in ``nodes/``) turns its model calls into ``dispatch`` and its block calls into
    ``block_call``, and routes attention through ``current_call``; ``blocks`` are ``protocols.EngineBlock``s."""

    def __init__(
        self,
        adapter: Adapter,
        blocks: Sequence[EngineBlock],
        stacks: Sequence[tuple[str, int]],
        config: XSlimConfig | None = None,
        profile: Profile | None = None,
        *,
        sigmas: Iterable[float] | Callable[[], Iterable[float]] | None = None,
        record_profile: bool = False,
        model_name: str | None = None,
        attention_seam: str = "sdpa",
        segment_transform: Callable | None = None,
        allocation_guard: Callable | None = None,
    ):
        # "sdpa": the engine routes torch's SDPA itself (diffusers); "host": the host hands each call to attend_next (ComfyUI)
        self.attention_seam = attention_seam
        # segment mode: (image delta, text delta | None) -> the same, e.g. a 1.x student's compensation module
        self.segment_transform = segment_transform
        self.adapter = adapter
        self.config = config or XSlimConfig()
        self.recording = record_profile
        self.blocks = blocks
        self.stacks = [(name, count) for name, count in stacks]  # tuples, also when given lists (JSON)
        self.model_name = model_name or adapter.display_name
        self.layers = [(spec.index, j) for spec in self.blocks for j in range(len(spec.attention))]
        if self.config.segment is not None and self.config.segment[1] >= len(self.blocks):
            first, last = self.config.segment
            raise ValueError(
                f"X-Slim: the reused block range {first}..{last} lies outside this model's {len(self.blocks)} blocks (0..{len(self.blocks) - 1})."
            )
        check_profile(profile, adapter, self.stacks)
        if profile is None and self.config.mode == "schedule" and self.config.pattern is None and not record_profile:
            raise ValueError(
                "X-Slim: schedule mode needs a profile of one uncached run (xslim_core.record_profile) or a "
                "fixed pattern; or use mode='online', which needs neither."
            )
        self.profile = profile
        self.store = TensorStore(self.config, allocation_guard)
        self._default_sigmas = sigmas
        self._thread = ThreadState()  # runs and calls belong to the thread that samples
        self._warned: set = set()

    # Per-thread state: two threads sampling through one engine each get their own run, rows and statistics.
    _run = property(lambda self: self._thread.run, lambda self, v: setattr(self._thread, "run", v))
    _call = property(lambda self: self._thread.call, lambda self, v: setattr(self._thread, "call", v))
    _last_stats = property(lambda self: self._thread.last_stats, lambda self, v: setattr(self._thread, "last_stats", v))
    _last_profile = property(
        lambda self: self._thread.last_profile, lambda self, v: setattr(self._thread, "last_profile", v)
    )

    @property
    def _sigmas_source(self):
        override = self._thread.sigmas
        return self._default_sigmas if override is UNSET else override

    # -- public ------------------------------------------------------------------------------------------
    @property
    def stats(self) -> RunStats:
        return self._run.stats if self._run is not None else self._last_stats

    @property
    def schedule(self):
        return self._run.schedule if self._run is not None else None

    @property
    def recorded_profile(self) -> Profile:
        self.end_run()
        if self._last_profile is None:
            problem = self._thread.profile_problem
            raise RuntimeError("X-Slim: no complete profiled run yet" + (f": {problem}." if problem else "."))
        return self._last_profile

    @contextlib.contextmanager
    def run(self, sigmas: Iterable[float]):
        """One sampling run over ``sigmas`` (T+1 values); its state is freed at the end. Statistics read
        afterwards are this run's (empty when no model call matched its sigmas)."""
        values = check_sigmas(sigmas)
        self.end_run()
        previous, self._thread.sigmas = self._thread.sigmas, values
        self._last_stats = RunStats(num_steps=len(values) - 1)
        try:
            yield self
        finally:
            self.end_run()
            self._thread.sigmas = previous

    def end_run(self) -> None:
        if self._run is None:
            return
        self._last_stats = self._run.stats
        if self.recording:
            built, self._thread.profile_problem = self._build_profile(self._run)
            self._last_profile = built or self._last_profile
        self._run = None

    @property
    def current_call(self) -> AttentionSeam | None:
        """The model call being carried out now (a host uses it to route that call's attention)."""
        return self._call

    def block_selector(self) -> BlockSelector:
        return BlockSelector(self.stacks, self._run.block_thresholds, self.config.protected_blocks)

    # -- the entry points of a host ----------------------------------------------------------------------
    def dispatch(self, call: EngineModelCall, forward: Callable):
        """One model call. ``call`` gives sigma, batch, row keys and per-row argument slices (EngineModelCall)."""
        if call.batch == 0:
            raise ValueError("X-Slim: the model was called with an empty batch (0 samples); pass at least one latent.")
        everything = call.args_for(list(range(call.batch)))
        if self._call is not None:
            return forward(*everything[0], **everything[1])
        located = self._locate(call)
        if located is None:  # not a step of this run (e.g. a second-order sampler's midpoint): uncached, counted
            run = self._run
            if run is not None and run.shape_key == call.shape_key:
                run.stats.add_uncached(call.batch)
            return forward(*everything[0], **everything[1])
        run, step = located
        run.max_step = max(run.max_step, step)
        keys = call.keys
        run.count_visits(keys, step)
        plans = [run.controller.plan(run.row(k), step) for k in keys]
        groups = self._group(plans)
        outputs = []
        for rows, plan in groups:
            args_g, kwargs_g = call.args_for(rows)
            self._call = CallContext(self, run, [keys[r] for r in rows], plan, step, call.sigma)
            try:
                outputs.append(self._call.execute(forward, args_g, kwargs_g))
            finally:
                self._call = None
        run.measure_cache()
        if len(groups) == 1:
            return outputs[0]
        return call.merge(outputs, [rows for rows, _ in groups])

    def run_uncached(self, call: EngineModelCall, forward: Callable):
        """A model call the host must run without caching (e.g. with a ControlNet): it runs as it is and still
        counts as full evaluations of its rows, so the statistics show what sampling really cost."""
        everything = call.args_for(list(range(call.batch)))
        located = self._locate(call) if self._call is None else None
        if located is not None:
            run, step = located
            run.max_step = max(run.max_step, step)
            run.count_visits(call.keys, step)
            for key in call.keys:
                run.stats.record(key, step, StepKind.FULL)
            run.stats.add_uncached(call.batch)
        return forward(*everything[0], **everything[1])

    def block_call(self, spec: EngineBlock, forward: Callable, args: tuple, kwargs: dict):
        if self._call is None:
            return forward(*args, **kwargs)
        return self._call.run_block(spec, forward, args, kwargs)

    def block_only_input(self, key, forward: Callable, args: tuple, kwargs: dict):
        """A module whose output only the blocks read (adapter.block_only_inputs); ``key`` names it and the
        shapes of its inputs. A skipped step passes the blocks through and the model drops their text stream,
        so any output of the right shape serves there: the last one computed in this run for inputs of the
        same shapes. On a small model the text refiner alone costs half of a skipped step."""
        call, run = self._call, self._run
        if call is None or run is None:
            return forward(*args, **kwargs)
        if call.plan.kind is StepKind.SKIP and key in run.block_inputs:
            return run.block_inputs[key]
        out = forward(*args, **kwargs)
        run.block_inputs[key] = out
        return out

    def _group(self, plans: list[StepPlan]) -> list[tuple[list[int], StepPlan]]:
        """Rows with the same plan share one call; RoPE models run token subsets one row at a time."""
        groups: dict = {}
        for r, p in enumerate(plans):
            own = p.kind is StepKind.TOKEN and self.adapter.per_row_positions
            key = (p.kind, p.skip_blocks, p.record_blocks, p.capture_kv, r if own else None)
            groups.setdefault(key, ([], p))[0].append(r)
        return list(groups.values())

    # -- runs --------------------------------------------------------------------------------------------
    def _current_sigmas(self) -> list[float] | None:
        source = self._sigmas_source
        if source is None:
            return None
        values = source() if callable(source) else source
        return [float(s) for s in values]

    def _locate(self, call: EngineModelCall) -> tuple[Run, int] | None:
        sigma = call.sigma
        run = self._run
        if run is not None and run.shape_key == call.shape_key:
            step = locate_step(run.sigmas, sigma, call.time_resolution)
            if step is not None and step >= run.max_step:
                return run, step
        sigmas = self._current_sigmas()
        if sigmas is None:
            if self.config.mode == "off" and not self.recording:
                return None
            raise RuntimeError(
                "X-Slim: the sampling schedule is unknown. Wrap sampling in `with cache.run(sigmas):` or pass "
                "sigmas=... (a list, or a callable such as lambda: pipe.scheduler.sigmas) when creating XSlim."
            )
        sigmas = check_sigmas(sigmas)
        step = locate_step(sigmas, sigma, call.time_resolution)
        if step is None:
            return None  # not a step of this schedule (e.g. a second-order sampler's midpoint): run uncached
        if run is not None and run.shape_key != call.shape_key and step > 0:
            # a new run starts at its first step; a new batch or resolution in the middle would start counting
            # afresh and report a fraction of the calls made, so it is refused
            raise ValueError(
                f"X-Slim: the latent changed in the middle of a run (at step {step}: {call.shape_key[0]} after "
                f"{run.shape_key[0]}). A run keeps one batch and resolution; start a new run (a new "
                "`cache.run(...)`, or sample again) to change them."
            )
        self.end_run()
        self._run = Run(self, sigmas, call.shape_key)
        return self._run, step

    def _build_profile(self, run: Run) -> tuple[Profile | None, str | None]:
        """The run's profile, or None and what kept it from being one (None: simply not every step was run)."""
        steps, stats = run.profile_steps, run.stats
        if not stats.one_call_per_step:
            return None, (
                f"the sampler evaluated the model more than once per step ({stats.uncached_calls} calls between "
                f"steps, {stats.repeated_calls} repeated steps); record the profile with a one-call-per-step "
                "sampler such as Euler"
            )
        if len(steps) != len(run.sigmas) - 1:
            return None, None  # a step not visited
        ordered = [steps[k] for k in range(len(steps))]
        try:  # the profile's own checks: e.g. a model whose outputs went NaN gives no usable profile
            return Profile(
                family=self.adapter.family,
                sigmas=run.sigmas,
                step_change=[s[0] / s[2] for s in ordered],
                block_change=[[b / s[2] for b in s[1]] for s in ordered],
                stacks=self.stacks,
                meta={"model": self.model_name},
                source="the recorded run",
            ), None
        except ValueError as err:
            return None, str(err).removeprefix("X-Slim: ").rstrip(".")

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)


def check_profile(profile: Profile | None, adapter: Adapter, stacks: Sequence[tuple[str, int]]) -> None:
    """Refuse a profile recorded on another family or block layout, naming both."""
    if profile is None:
        return
    if not isinstance(profile, Profile):
        raise ValueError(
            f"X-Slim: profile must be a Profile (xslim_core.record_profile or Profile.load), got "
            f"{type(profile).__name__}."
        )
    check_fields(profile, "profile")  # again: its lists may have been changed since it was made
    if profile.family != adapter.family:
        raise ValueError(
            f"X-Slim: this profile/preset is for {profile.family!r} models, but the model is "
            f"{adapter.display_name} ({adapter.family!r}). Record a profile on this model."
        )
    if [tuple(s) for s in profile.stacks] != [tuple(s) for s in stacks]:
        raise ValueError(f"X-Slim: the profile was recorded on blocks {profile.stacks}, this model has {stacks}.")


# The diffusers host and the forecast had their home here; these names still import from this module.
_MOVED = {
    "XSlim": "diffusers_host",
    "record_profile": "diffusers_host",
    "run_cached": "diffusers_host",
    "forecast_residual": "forecast",
}


def __getattr__(name: str):
    if name in _MOVED:  # imported on first use: diffusers_host itself imports this module
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
