"""The X-Slim engine: hooks on a model's forward, its blocks and its attention modules.

One model call goes: the model-forward hook finds the step from sigma and asks the controller for a plan per
batch row; rows with the same plan run together (usually the whole batch in one call). Inside the call the
block hooks carry out the plan: pass the stack through (skip), add cached block residuals (block refresh) or
run every block on a token subset with full-length K/V (token refresh). Embeddings and the final layer always
run, as the model's own forward does them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import threading
import warnings
from typing import Callable, Iterable

import torch

from .adapters import Adapter, ModelCall, adapter_for
from .config import StepKind, StepPlan, XSlimConfig
from .hooks import wrap_forward
from .controller import FullController, OnlineController, ScheduleController, SegmentController
from .profile import Profile, check_fields
from .schedule import BlockSelector, block_thresholds, build_schedule
from .state import RowState, RunStats, TensorStore
from .tokens import IMG_ONLY, gather_tokens, intercept_sdpa, join_sequence, scatter_tokens, select_tokens, split_sequence, widen_mask

FP16_MAX = 65504.0


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add; in fp16 done in fp32 and clamped, as overflowed activations would poison later steps."""
    if a.dtype == torch.float16:
        return (a.float() + b.float()).clamp_(-FP16_MAX, FP16_MAX).half()
    return a + b


def forecast_residual(row: RowState, sigma: float, order: int, limit: float, like: torch.Tensor) -> torch.Tensor:
    """Newton extrapolation over sigma of a row's step residuals (order 1: last two computed steps, order 2: last
    three), computed in fp32. Falls back to the next lower order while the history is short or when the
    correction exceeds ``limit`` x the last residual (a diverging forecast is worse than plain reuse)."""
    return forecast_rows([row], sigma, order, limit, like)


def _history(row: RowState, order: int) -> list:
    history = [(row.delta_last, row.sigma_last), (row.delta_prev, row.sigma_prev), (row.delta_prev2, row.sigma_prev2)]
    known = next((i for i, (d, s) in enumerate(history[: order + 1]) if d is None or s is None), order + 1)
    return history[:known]


def forecast_rows(rows: list[RowState], sigma: float, order: int, limit: float, like: torch.Tensor) -> torch.Tensor:
    """``forecast_residual`` for several rows at once, as one batch [rows, ...]. Rows that share their sigma
    history (the usual case: every row of a call was computed at the same steps) are extrapolated together, with
    the divergence check per row and no host sync; others one by one."""
    histories = [_history(r, order) for r in rows]
    if any([s for _, s in h] != [s for _, s in histories[0]] for h in histories[1:]):
        return torch.cat([forecast_rows([r], sigma, order, limit, like) for r in rows])
    ss = [float(s) for _, s in histories[0]]
    ds = [TensorStore.batch([h[i][0] for h in histories], like).float() for i in range(len(ss))]  # each converted once
    last = ds[0]
    dims = tuple(range(1, last.ndim))
    bound = limit * last.abs().sum(dim=dims)
    out = last
    for k in range(1, len(ss)):  # ascending: the highest accepted order wins
        if len(set(ss[: k + 1])) < k + 1:
            continue
        first = (ds[0] - ds[1]) / (ss[0] - ss[1])
        correction = first * (sigma - ss[0])
        if k == 2:
            second = (first - (ds[1] - ds[2]) / (ss[1] - ss[2])) / (ss[0] - ss[2])
            correction = correction + second * (sigma - ss[0]) * (sigma - ss[1])
        ok = (correction.abs().sum(dim=dims) <= bound).reshape(-1, *([1] * len(dims)))
        out = torch.where(ok, last + correction, out)
    return out.to(like.dtype)


def _nonzero(x: float) -> float:
    return x if abs(x) > 1e-8 else 1e-8


def locate_step(sigmas: list[float], sigma: float, resolution: float = 0.0) -> int | None:
    """Index of ``sigma`` among the run's step sigmas, or None (e.g. a second-order sampler's extra point).
    ``resolution`` is the relative precision the timestep arrived in (bf16 pipelines round it to 1/128)."""
    tol = max(1e-4 * max(1.0, abs(sigmas[0])), resolution * abs(sigma))
    best = min(range(len(sigmas) - 1), key=lambda k: abs(sigmas[k] - sigma))
    return best if abs(sigmas[best] - sigma) <= tol else None


_UNSET = object()


class _ThreadState(threading.local):
    def __init__(self):
        self.run: _Run | None = None
        self.call: _CallContext | None = None
        self.sigmas = _UNSET  # a run() context's sigmas, else the engine's own source
        self.last_stats = RunStats()
        self.last_profile: Profile | None = None


MAX_SIGMA = 1e6  # far above any schedule (EDM's 80, SD's 14.6, flow matching's 1): beyond, step differences overflow


def check_sigmas(sigmas) -> list[float]:
    """A run's schedule as floats: at least two finite values (one step)."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"X-Slim: sigmas must be a sequence of numbers, got {type(sigmas).__name__}.") from None
    if len(values) < 2 or not all(math.isfinite(v) and abs(v) <= MAX_SIGMA for v in values):
        raise ValueError(f"X-Slim: a run needs at least two finite sigmas (one step) of at most {MAX_SIGMA:g}, got {values[:8]}.")
    if any(b > a for a, b in zip(values, values[1:])) or values[0] == values[-1]:
        raise ValueError(f"X-Slim: sigmas must fall from the first to the last (noise to clean) and never rise, got "
                         f"{values[:8]}; steps could not be told apart.")
    return values


class _Run:
    """One sampling run: its schedule, controller, per-row state and statistics."""

    def __init__(self, engine: "XSlim", sigmas: list[float], shape_key):
        self.sigmas = sigmas
        self.shape_key = shape_key
        self.rows: dict = {}
        self.max_step = -1
        cfg = engine.config
        layers = len(engine.layers)
        self.schedule = None
        if engine.recording or cfg.mode == "off":
            self.controller = FullController(record=engine.recording)
        elif cfg.mode == "segment":
            self.controller = SegmentController(cfg.segment, len(sigmas) - 1)
        elif cfg.mode == "schedule":
            self.schedule = build_schedule(engine.profile, sigmas, cfg, engine.stacks)
            self.controller = ScheduleController(self.schedule, layers)
        else:
            self.controller = OnlineController(cfg, sigmas, layers)
        self.stats = RunStats(num_blocks=len(engine.blocks), num_steps=len(sigmas) - 1)
        # Block thresholds: the schedule's, the configured value, the profile's medians, or (online, with
        # neither) the medians of the block changes seen at the previous scoring step.
        self.adaptive_blocks = False
        if self.schedule is not None:
            self.block_thresholds = self.schedule.block_thresholds
        elif cfg.block_threshold is not None or engine.recording:
            self.block_thresholds = {name: cfg.block_threshold or 0.0 for name, _ in engine.stacks}
        elif engine.profile is not None:
            self.block_thresholds = block_thresholds(engine.profile, cfg, engine.stacks)
        else:
            self.block_thresholds = {name: 0.0 for name, _ in engine.stacks}
            self.adaptive_blocks = True
        self.profile_steps: dict[int, list] = {}  # step -> [sum step change, sum block changes, count]
        self.visited: set = set()  # (row key, step) evaluated so far
        self.keeps_state = engine.recording or cfg.mode != "off"  # "off" only counts
        # a token refresh scatters its tokens into the last output; without one ahead, no copy of it is kept
        self.keeps_last_out = self.controller.plans_token_refreshes
        self.block_inputs: dict = {}  # (module name, input shapes) -> its last output (see XSlim._block_only_input)
        self.tracks_rate = isinstance(self.controller, OnlineController)

    def measure_cache(self) -> None:
        """Cache memory now and at its peak; once per model call (every group of rows is in by then)."""
        if self.keeps_state:
            self.stats.cache_bytes = sum(r.nbytes() for r in self.rows.values())
            self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, self.stats.cache_bytes)

    def row(self, key) -> RowState:
        return self.rows.setdefault(key, RowState())

    def count_visits(self, keys, step: int) -> None:
        """A second evaluation of a step for the same row (Heun's corrector lands on the next step's sigma) is
        counted: a profile of such a run would mix two evaluations per step."""
        if any((key, step) in self.visited for key in keys):
            self.stats.repeated_calls += 1
        self.visited.update((key, step) for key in keys)


class _CallContext:
    """Carries out one plan for a group of rows during one model call."""

    def __init__(self, engine: "XSlim", run: _Run, keys: list, plan: StepPlan, step: int, sigma: float):
        self.engine, self.run, self.keys, self.plan, self.step, self.sigma = engine, run, keys, plan, step, sigma
        self.rows = [run.row(k) for k in keys]
        self.store = engine.store
        self.I = self.O = self.idx = None
        self.n_img = 0
        self.layer = None  # (key, layout) of the attention module running now
        self.pending: list = []  # host seam: (key, layout) of the attention calls the running block will make
        self.layers_seen: set = set()
        self.selectors = [engine.block_selector() for _ in keys] if plan.record_blocks else None
        self.new_residuals = [dict() for _ in keys]
        self.new_kv = [dict() for _ in keys]
        self.block_change: list[float] = []
        self.positions: dict = {}  # gathered RoPE tables / masks of this call, shared by its blocks
        self.segment_in = None  # segment mode: the streams that entered the recorded block range
        self.new_segment: list = [None] * len(keys)

    # -- rows <-> batch ------------------------------------------------------------------------------------
    def _batch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return TensorStore.batch([getattr(r, name) for r in self.rows], like)

    def execute(self, forward, args, kwargs):
        plan = self.plan
        needs_attention = (plan.kind is StepKind.TOKEN or plan.capture_kv) and self.engine.attention_seam == "sdpa"
        self.engine._call = self
        try:
            with intercept_sdpa(self.attend) if needs_attention else contextlib.nullcontext():
                out = forward(*args, **kwargs)
        finally:
            self.engine._call = None
        if plan.kind is StepKind.TOKEN and len(self.layers_seen) != len(self.engine.layers):
            raise RuntimeError(
                "X-Slim: token refresh could not reach the attention kernel of every layer "
                f"({len(self.layers_seen)}/{len(self.engine.layers)}); this attention backend is not supported. "
                "Disable the token level (levels without 'token')."
            )
        self.finish()
        return out

    # -- blocks ------------------------------------------------------------------------------------------
    def run_block(self, spec, forward, args, kwargs):
        kind, plan = self.plan.kind, self.plan
        first, last = spec.index == 0, spec.index == len(self.engine.blocks) - 1
        seg = plan.segment
        in_segment = seg is not None and seg[0] <= spec.index <= seg[1]
        if kind is StepKind.FULL and not (first or last or plan.record_blocks or in_segment):
            self.run.stats.block_evals += len(self.rows)
            self.run.stats.block_calls += 1
            return forward(*args, **kwargs)  # nothing to observe in the middle of a plain full step
        if kind is StepKind.SKIP and not (first or last) and hasattr(spec, "passthrough"):
            out = spec.passthrough(args, kwargs)  # the middle of a skipped step: inputs pass through as they are
            if out is not None:
                return out
        call = spec.bind(args, kwargs)
        img, txt = call.img, call.txt
        if first:  # a block that adds to its input in place would change I under us
            self.I, self.n_img = (self.store.keep(img) if getattr(call, "mutates_inputs", False) else img), img.shape[1]
            if kind is StepKind.TOKEN:
                self.idx = select_tokens(self._batch("delta_last", img), self._batch("delta_prev", img), self.engine.config.token_ratio)
                img = call.img = gather_tokens(img, self.idx)

        if kind is StepKind.SKIP:
            out_img = _add(img, self._skip_residual(img)) if first else img
            out_txt = txt
        elif kind is StepKind.BLOCK and in_segment:
            out_img, out_txt = self._reuse_segment(call, img, txt) if spec.index == seg[0] else (img, txt)
        elif kind is StepKind.BLOCK and spec.index in plan.skip_blocks:
            out_img, out_txt = self._reuse_block(spec.index, img, txt)
        else:
            if in_segment and spec.index == seg[0]:  # blocks may add to their inputs in place: copy
                self.segment_in = tuple(self.store.keep(t) for t in call.streams(img, txt, self.n_img))
            out_img, out_txt = self._compute_block(spec, call, forward, img, txt)
            if in_segment and spec.index == seg[1]:
                self._record_segment(call, out_img, out_txt)

        if last:
            if kind is StepKind.TOKEN:  # back to full length: reused tokens keep their last output
                n_now = self.idx.shape[1]
                self.O = scatter_tokens(self._batch("last_out", out_img), self.idx, call.image_tokens(out_img, n_now))
                out_img = call.with_image_tokens(out_img, self.O, n_now)
            else:
                self.O = call.image_tokens(out_img, self.n_img)
        return call.pack(out_img, out_txt)

    def _skip_residual(self, like: torch.Tensor) -> torch.Tensor:
        """The residual a skipped step adds: the last computed one, or its extrapolation over sigma."""
        order = self.engine.config.forecast
        if order == 0:
            return self._batch("delta_last", like)
        return forecast_rows(self.rows, self.sigma, order, self.engine.config.forecast_limit, like)

    def _reuse_block(self, index: int, img, txt):
        parts = [row.block_residuals[index] for row in self.rows]
        out_img = _add(img, TensorStore.batch([p[0] for p in parts], img))
        if txt is None or parts[0][1] is None:
            return out_img, txt
        return out_img, _add(txt, TensorStore.batch([p[1] for p in parts], txt))

    def _record_segment(self, call, out_img, out_txt) -> None:
        """Segment mode, the step before the last: keep each row's delta over the block range."""
        outs = call.streams(out_img, out_txt, self.n_img)
        delta = [None if o is None or i is None else o - i for o, i in zip(outs, self.segment_in)]
        for j in range(len(self.rows)):
            self.new_segment[j] = tuple(None if d is None else self.store.put(d[j : j + 1]) for d in delta)
        self.segment_in = None

    def _reuse_segment(self, call, img, txt):
        """Segment mode, the last step: the range's output is its input plus the (transformed) recorded delta."""
        image, text = call.streams(img, txt, self.n_img)
        d_img = TensorStore.batch([r.segment_delta[0] for r in self.rows], image)
        d_txt = None if text is None or self.rows[0].segment_delta[1] is None else TensorStore.batch([r.segment_delta[1] for r in self.rows], text)
        transform = self.engine.segment_transform
        if transform is not None:
            d_img, d_txt = transform(d_img, d_txt)
        return call.join_streams(_add(image, d_img), text if d_txt is None else _add(text, d_txt), self.n_img)

    def _compute_block(self, spec, call: BoundBlock, forward, img, txt):
        plan, stats = self.plan, self.run.stats
        if plan.kind is StepKind.TOKEN:
            self.engine.adapter.gather_positions(call, self.idx, self.n_img, self.positions)
        recording = plan.record_blocks
        if recording:  # blocks may update their inputs in place; keep what went in
            img, txt = self.store.keep(img), self.store.keep(txt)
        out_img, out_txt = call.call(forward)
        fraction = self.idx.shape[1] / self.n_img if plan.kind is StepKind.TOKEN else 1.0
        stats.block_evals += len(self.rows) * fraction
        stats.block_calls += 1
        if recording:
            change = (out_img.float() - img.float()).abs().mean(dim=(1, 2)).tolist()
            self.block_change.append(sum(change) / len(change))
            for j, e in enumerate(change):
                if self.selectors[j].skip(spec.index, e):
                    txt_res = None if txt is None or out_txt is None else self.store.put(out_txt[j : j + 1] - txt[j : j + 1])
                    self.new_residuals[j][spec.index] = (self.store.put(out_img[j : j + 1] - img[j : j + 1]), txt_res)
        return out_img, out_txt

    # -- attention ---------------------------------------------------------------------------------------
    def attend(self, sdpa, q, k, v, attn_mask=None, *args, **kwargs):
        """Attention kernel hook: keep image K/V (capture) or attend a token subset to full-length K/V."""
        layer = self.layer
        if layer is None or layer[0] in self.layers_seen or k.ndim != 4:
            return sdpa(q, k, v, attn_mask, *args, **kwargs)
        key, layout = layer
        self.layers_seen.add(key)
        n_now = self.idx.shape[1] if self.plan.kind is StepKind.TOKEN else self.n_img
        txt_len = 0 if layout == IMG_ONLY else k.shape[2] - n_now  # the rest of the joint sequence is text
        k_txt, k_img = split_sequence(k, layout, txt_len, dim=2)
        v_txt, v_img = split_sequence(v, layout, txt_len, dim=2)
        if self.plan.kind is StepKind.TOKEN:
            index = self.idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k_img = TensorStore.batch([r.kv[key][0] for r in self.rows], k).scatter(2, index, k_img)
            v_img = TensorStore.batch([r.kv[key][1] for r in self.rows], v).scatter(2, index, v_img)
            k, v = join_sequence(k_txt, k_img, layout, 2), join_sequence(v_txt, v_img, layout, 2)
            attn_mask = widen_mask(attn_mask, layout, txt_len, self.n_img)
        if self.plan.capture_kv or self.plan.kind is StepKind.TOKEN:
            for j in range(len(self.rows)):
                self.new_kv[j][key] = (self.store.put(k_img[j : j + 1], copy=False), self.store.put(v_img[j : j + 1], copy=False))
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    # -- after the call ----------------------------------------------------------------------------------
    def finish(self) -> None:
        if self.I is None or self.O is None:
            return
        plan, kind, run = self.plan, self.plan.kind, self.run
        self._check_finite()
        n_computed = self.idx.shape[1] if kind is StepKind.TOKEN else (0 if kind is StepKind.SKIP else self.n_img)
        for j, (key, row) in enumerate(zip(self.keys, self.rows)):
            run.stats.record(key, self.step, kind)
            run.stats.tokens_computed += n_computed
            run.stats.tokens_total += self.n_img
            if not run.keeps_state:
                continue
            out = self.O[j : j + 1]
            if kind is not StepKind.SKIP:
                delta = out - self.I[j : j + 1]
                if run.tracks_rate and row.delta_last is not None:  # online controller only: one host sync
                    self._track_change(row, delta)
                if self.engine.config.forecast >= 2:
                    row.delta_prev2, row.sigma_prev2 = row.delta_prev, row.sigma_prev
                row.delta_prev, row.sigma_prev = row.delta_last, row.sigma_last
                row.delta_last, row.sigma_last = self.store.put(delta), self.sigma
                row.skips_in_row = 0
            else:
                row.skips_in_row += 1
            if kind in (StepKind.BLOCK, StepKind.TOKEN):
                row.refreshes_in_row += 1
                row.last_partial = kind
            elif kind is StepKind.FULL:
                if plan.segment is not None:
                    row.segment_delta = self.new_segment[j]
                row.refreshes_in_row, row.last_partial = 0, None
                row.block_residuals = self.new_residuals[j] if plan.record_blocks else {}
                row.skip_blocks = frozenset(self.new_residuals[j]) if plan.record_blocks else None
                if not plan.capture_kv:
                    row.kv = {}
            if plan.capture_kv or kind is StepKind.TOKEN:
                row.kv.update(self.new_kv[j])
            if run.keeps_last_out:
                row.last_out = self.store.put(out)
        if self.engine.recording:
            self._record_profile_step()
        if plan.record_blocks and run.adaptive_blocks and self.block_change:
            start = 0
            for name, count in self.engine.stacks:
                run.block_thresholds[name] = float(torch.tensor(self.block_change[start : start + count]).median())
                start += count

    def _check_finite(self) -> None:
        """NaN or inf in the model's output make every change measure NaN: a controller then plans on nothing
        and the summary would describe a run that produced no image. Checked at the first and last step only
        (one host sync each), which catches a bad input latent and a blow-up on the way."""
        stats = self.run.stats
        if stats.non_finite_step is not None or self.step not in (0, stats.num_steps - 1):
            return
        if not bool(torch.isfinite(self.O).all()):
            stats.non_finite_step = self.step
            self.engine.warn_once(
                f"X-Slim: the model's output holds NaN or inf at step {self.step}; the result is invalid. Check the "
                "input latent and the model: X-Slim only reuses what the model computed."
            )

    def _track_change(self, row: RowState, delta: torch.Tensor) -> None:
        """Online controller: the relative L1 change of the step residual per unit sigma (the error of plain reuse
        grows with it) and, with forecasting, the relative L1 second divided difference over sigma (the error of
        a linear forecast grows with it). One host sync either way."""
        new, last = delta.float(), TensorStore.get(row.delta_last, delta).float()
        last_norm = last.abs().sum().clamp_min(1e-12)
        parts = [(new - last).abs().sum() / last_norm]
        curvature = self.engine.config.forecast >= 1 and row.delta_prev is not None and row.sigma_prev is not None
        if curvature:
            prev = TensorStore.get(row.delta_prev, delta).float()
            h, h_prev = _nonzero(self.sigma - row.sigma_last), _nonzero(row.sigma_last - row.sigma_prev)
            second = ((new - last) / h - (last - prev) / h_prev).abs().sum() / _nonzero(abs(self.sigma - row.sigma_prev))
            parts += [second, last_norm]
        values = torch.stack(parts).tolist() if curvature else [parts[0].item()]
        row.rate = values[0] / max(abs(row.sigma_last - self.sigma), 1e-8)
        if curvature:
            row.curvature = values[1] / max(values[2], 1e-12)

    def _record_profile_step(self) -> None:
        change = [
            (r.delta_last.float() - r.delta_prev.float()).abs().mean().item() if r.delta_prev is not None else 0.0
            for r in self.rows
        ]
        entry = self.run.profile_steps.setdefault(self.step, [0.0, [0.0] * len(self.block_change), 0])
        w = len(self.rows)
        entry[0] += sum(change)
        entry[1] = [a + b * w for a, b in zip(entry[1], self.block_change)]
        entry[2] += w


class XSlimEngine:
    """The host-agnostic engine: runs, per-row plans and the block protocol. A host (diffusers hooks below,
    the ComfyUI layer in ``nodes/``) turns its model calls into ``dispatch`` and its block calls into
    ``block_call``; ``blocks`` are specs whose ``bind(args, kwargs)`` exposes the image/text streams."""

    def __init__(
        self,
        adapter: Adapter,
        blocks: list,
        stacks: list[tuple[str, int]],
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
        # "sdpa": the engine routes torch's SDPA itself (diffusers); "host": the host calls attend() (ComfyUI)
        self.attention_seam = attention_seam
        # segment mode: (image delta, text delta | None) -> the same, e.g. a 1.x student's compensation module
        self.segment_transform = segment_transform
        self.adapter = adapter
        self.config = config or XSlimConfig()
        self.recording = record_profile
        self.blocks = blocks
        self.stacks = [tuple(s) for s in stacks]
        self.model_name = model_name or adapter.display_name
        self.layers = [(spec.index, j) for spec in self.blocks for j in range(len(spec.attention))]
        if self.config.segment is not None and self.config.segment[1] >= len(self.blocks):
            first, last = self.config.segment
            raise ValueError(f"X-Slim: the reused block range {first}..{last} lies outside this model's {len(self.blocks)} blocks (0..{len(self.blocks) - 1}).")
        check_profile(profile, adapter, self.stacks)
        if profile is None and self.config.mode == "schedule" and self.config.pattern is None and not record_profile:
            raise ValueError(
                "X-Slim: schedule mode needs a profile of one uncached run (xslim_core.record_profile) or a "
                "fixed pattern; or use mode='online', which needs neither."
            )
        self.profile = profile
        self.store = TensorStore(self.config, allocation_guard)
        self._default_sigmas = sigmas
        self._thread = _ThreadState()  # runs and calls belong to the thread that samples
        self._warned: set = set()

    # Per-thread state: two threads sampling through one engine each get their own run, rows and statistics.
    _run = property(lambda self: self._thread.run, lambda self, v: setattr(self._thread, "run", v))
    _call = property(lambda self: self._thread.call, lambda self, v: setattr(self._thread, "call", v))
    _last_stats = property(lambda self: self._thread.last_stats, lambda self, v: setattr(self._thread, "last_stats", v))
    _last_profile = property(lambda self: self._thread.last_profile, lambda self, v: setattr(self._thread, "last_profile", v))

    @property
    def _sigmas_source(self):
        override = self._thread.sigmas
        return self._default_sigmas if override is _UNSET else override

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
            problem = getattr(self._thread, "profile_problem", None)
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
    def current_call(self) -> "_CallContext | None":
        """The model call being carried out now (a host uses it to route that call's attention)."""
        return self._call

    def block_selector(self) -> BlockSelector:
        return BlockSelector(self.stacks, self._run.block_thresholds, self.config.protected_blocks)

    # -- the two entry points of a host ------------------------------------------------------------------
    def dispatch(self, call, forward):
        """One model call. ``call`` gives sigma, batch, row keys and per-row argument slices (ModelCall)."""
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
            ctx = _CallContext(self, run, [keys[r] for r in rows], plan, step, call.sigma)
            outputs.append(ctx.execute(forward, args_g, kwargs_g))
        run.measure_cache()
        if len(groups) == 1:
            return outputs[0]
        return call.merge(outputs, [rows for rows, _ in groups])

    def run_uncached(self, call, forward):
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

    def block_call(self, spec, forward, args, kwargs):
        if self._call is None:
            return forward(*args, **kwargs)
        return self._call.run_block(spec, forward, args, kwargs)

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

    def _locate(self, call) -> tuple[_Run, int] | None:
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
            raise ValueError(f"X-Slim: the latent changed in the middle of a run (at step {step}: {call.shape_key[0]} after "
                             f"{run.shape_key[0]}). A run keeps one batch and resolution; start a new run (a new "
                             "`cache.run(...)`, or sample again) to change them.")
        self.end_run()
        self._run = _Run(self, sigmas, call.shape_key)
        return self._run, step

    def _build_profile(self, run: _Run) -> tuple[Profile | None, str | None]:
        """The run's profile, or None and what kept it from being one (None: simply not every step was run)."""
        steps, stats = run.profile_steps, run.stats
        if not stats.one_call_per_step:
            return None, (f"the sampler evaluated the model more than once per step ({stats.uncached_calls} calls between "
                          f"steps, {stats.repeated_calls} repeated steps); record the profile with a one-call-per-step "
                          "sampler such as Euler")
        if len(steps) != len(run.sigmas) - 1:
            return None, None  # a step not visited
        ordered = [steps[k] for k in range(len(steps))]
        try:  # the profile's own checks: e.g. a model whose outputs went NaN gives no usable profile
            return Profile(family=self.adapter.family, sigmas=run.sigmas, step_change=[s[0] / s[2] for s in ordered],
                           block_change=[[b / s[2] for b in s[1]] for s in ordered], stacks=self.stacks,
                           meta={"model": self.model_name}, source="the recorded run"), None
        except ValueError as err:
            return None, str(err).removeprefix("X-Slim: ").rstrip(".")

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)


def check_profile(profile: Profile | None, adapter: Adapter, stacks: list[tuple[str, int]]) -> None:
    """Refuse a profile recorded on another family or block layout, naming both."""
    if profile is None:
        return
    if not isinstance(profile, Profile):
        raise ValueError(f"X-Slim: profile must be a Profile (xslim_core.record_profile or Profile.load), got "
                         f"{type(profile).__name__}.")
    check_fields(profile, "profile")  # again: its lists may have been changed since it was made
    if profile.family != adapter.family:
        raise ValueError(
            f"X-Slim: this profile/preset is for {profile.family!r} models, but the model is "
            f"{adapter.display_name} ({adapter.family!r}). Record a profile on this model."
        )
    if [tuple(s) for s in profile.stacks] != [tuple(s) for s in stacks]:
        raise ValueError(f"X-Slim: the profile was recorded on blocks {profile.stacks}, this model has {stacks}.")


class XSlim(XSlimEngine):
    """X-Slim caching on one diffusers DiT (SD3/SD3.5, FLUX, HunyuanVideo, DiT), through forward hooks.

    >>> cache = XSlim(transformer, XSlimConfig(mode="schedule"), profile)   # installs hooks
    >>> with cache.run(sigmas):                                              # one sampling run
    ...     latents = sample(transformer, ...)
    >>> print(cache.stats.summary()); cache.remove()

    ``sigmas`` may also be given once as a list or a callable (e.g. ``lambda: pipe.scheduler.sigmas``); a run
    then starts by itself at the first step and restarts when the step index goes back, the step count or
    the latent shape changes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: XSlimConfig | None = None,
        profile: Profile | None = None,
        *,
        sigmas: Iterable[float] | Callable[[], Iterable[float]] | None = None,
        adapter: Adapter | None = None,
        record_profile: bool = False,
        segment_transform: Callable | None = None,
    ):
        if getattr(model, "_xslim_cache", None) is not None:
            raise ValueError(
                "X-Slim is already installed on this model. Remove that cache first (cache.remove(), or leave its "
                "`with` block), or keep using it: a second cache on the same blocks would disturb the first."
            )
        self.model = model
        adapter = adapter or adapter_for(model)
        super().__init__(
            adapter, adapter.blocks(model), adapter.stack_sizes(model), config, profile,
            sigmas=sigmas, record_profile=record_profile, model_name=type(model).__name__,
            segment_transform=segment_transform,
        )
        self._undo: list[Callable[[], None]] = []
        self._forward_signature = None
        self._install()
        model.__dict__["_xslim_cache"] = self  # plain attribute: not a submodule, not in the state dict
        self._undo.append(lambda: model.__dict__.pop("_xslim_cache", None))

    def remove(self) -> None:
        """Take every hook off the model; it is then exactly the model it was."""
        self.end_run()
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- hooks -------------------------------------------------------------------------------------------
    def _install(self) -> None:
        self._wrap(self.model, self._model_forward)
        for name in self.adapter.block_only_inputs:
            module = getattr(self.model, name, None)
            if isinstance(module, torch.nn.Module):
                self._wrap(module, functools.partial(self._block_only_input, name))
        for spec in self.blocks:
            self._wrap(spec.module, functools.partial(self._block_forward, spec))
            for j, (module, layout) in enumerate(spec.attention):
                key = (spec.index, j)
                pre = module.register_forward_pre_hook(functools.partial(self._enter_attention, (key, layout)))
                post = module.register_forward_hook(self._leave_attention)
                self._undo += [pre.remove, post.remove]

    def _wrap(self, module: torch.nn.Module, handler) -> None:
        self._undo.append(wrap_forward(module, handler))

    def _enter_attention(self, layer, module, args):
        if self._call is not None:
            self._call.layer = layer

    def _leave_attention(self, module, args, output):
        if self._call is not None:
            self._call.layer = None

    def _block_forward(self, spec, forward, *args, **kwargs):
        return self.block_call(spec, forward, args, kwargs)

    def _block_only_input(self, name: str, forward, *args, **kwargs):
        """A module whose output only the blocks read (adapter.block_only_inputs). A skipped step passes the
        blocks through and the model drops their text stream, so any output of the right shape serves there:
        the last one computed in this run for inputs of the same shapes. On a small model the text refiner
        alone costs half of a skipped step."""
        call, run = self._call, self._run
        if call is None or run is None:
            return forward(*args, **kwargs)
        key = (name, _shapes(args), _shapes(kwargs.values()))
        if call.plan.kind is StepKind.SKIP and key in run.block_inputs:
            return run.block_inputs[key]
        out = forward(*args, **kwargs)
        run.block_inputs[key] = out
        return out

    def _model_forward(self, forward, *args, **kwargs):
        if self._call is not None:
            return forward(*args, **kwargs)
        if self._forward_signature is None:  # names from the class's own forward, looked up once
            self._forward_signature = inspect.signature(type(self.model).forward.__get__(self.model))
        call = ModelCall(self.adapter, None, args, kwargs, self._forward_signature)
        reason = self.adapter.unsupported(call)
        if reason:
            self.warn_once(f"X-Slim: this call runs uncached ({reason}).")
            return forward(*args, **kwargs)
        return self.dispatch(call, forward)


def _shapes(values) -> tuple:
    return tuple((tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else type(v).__name__ for v in values)


def record_profile(model: torch.nn.Module, sample: Callable[[], object], sigmas: Iterable[float], **kwargs) -> Profile:
    """Run ``sample()`` (one uncached sampling run over ``sigmas``) and return its X-Slim profile."""
    with XSlim(model, XSlimConfig(mode="off"), record_profile=True, **kwargs) as cache:
        with cache.run(sigmas):
            sample()
        return cache.recorded_profile


def run_cached(model: torch.nn.Module, config: XSlimConfig, profile: Profile | None, sigmas, sample: Callable[[], object]):
    """Install X-Slim, run ``sample()`` once over ``sigmas``, take the hooks off; returns (output, stats)."""
    with XSlim(model, config, profile) as cache:
        with cache.run(sigmas):
            out = sample()
        return out, cache.stats
