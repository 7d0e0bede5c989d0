"""Carrying out one plan for a group of rows during one model call: the block hooks skip the stack, add cached
block residuals (block refresh), replay a recorded block range (segment mode) or run every block on a token
subset with full-length K/V (token refresh); after the call each row's state is updated."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch

from .config import StepKind, StepPlan
from .forecast import forecast_rows
from .protocols import EngineBlock, EngineBlockCall
from .run import Run
from .segment import Streams, range_delta, replay_range
from .state import RowState, TensorStore
from .tokens import (
    IMG_ONLY,
    gather_tokens,
    intercept_sdpa,
    join_sequence,
    scatter_tokens,
    select_tokens,
    split_sequence,
    widen_mask,
)

if TYPE_CHECKING:
    from .engine import XSlimEngine

FP16_MAX = 65504.0


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Residual add; in fp16 done in fp32 and clamped, as overflowed activations would poison later steps."""
    if a.dtype == torch.float16:
        return (a.float() + b.float()).clamp_(-FP16_MAX, FP16_MAX).half()
    return a + b


def _nonzero(x: float) -> float:
    return x if abs(x) > 1e-8 else 1e-8


def _segment_delta(row: RowState) -> tuple:
    """The delta a row recorded over the block range; the segment controller plans its replay only for rows
    that hold one."""
    assert row.segment_delta is not None, "X-Slim: a block range was replayed without a recorded delta"
    return row.segment_delta


def _step_change(row: RowState) -> float:
    """Mean |delta_last - delta_prev| of a row; 0 until it has two computed steps."""
    if row.delta_prev is None:
        return 0.0
    # delta_prev only ever takes delta_last's previous value, so delta_last is set whenever delta_prev is
    assert row.delta_last is not None
    return (row.delta_last.float() - row.delta_prev.float()).abs().mean().item()


class CallContext:
    """Carries out one plan for a group of rows during one model call. A host reaches it as
    ``XSlimEngine.current_call`` and uses only its attention seam (``protocols.AttentionSeam``)."""

    def __init__(self, engine: XSlimEngine, run: Run, keys: list, plan: StepPlan, step: int, sigma: float):
        self.engine, self.run, self.keys, self.plan, self.step, self.sigma = engine, run, keys, plan, step, sigma
        self.rows = [run.row(k) for k in keys]
        self.store = engine.store
        self.I: torch.Tensor | None = None  # image tokens entering the first block
        self.O: torch.Tensor | None = None  # image tokens leaving the last block
        self.idx: torch.Tensor | None = None  # token refresh: the token subset, chosen at the first block
        self.n_img = 0
        self._layer: tuple | None = None  # (key, layout) of the attention module running now
        self._pending: list = []  # host seam: (key, layout) of the attention calls the running block will make
        self.layers_seen: set = set()
        self.selectors = [engine.block_selector() for _ in keys] if plan.record_blocks else None
        self.new_residuals: list[dict[int, tuple]] = [dict() for _ in keys]  # block index -> (img, txt) residual
        self.new_kv: list[dict[tuple, tuple]] = [dict() for _ in keys]  # attention layer -> (K, V)
        self.block_change: list[float] = []
        self.positions: dict = {}  # gathered RoPE tables / masks of this call, shared by its blocks
        self.segment_in: Streams | None = None  # segment mode: the streams that entered the recorded block range
        self.new_segment: list = [None] * len(keys)

    # -- rows <-> batch ------------------------------------------------------------------------------------
    def _batch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return TensorStore.batch([getattr(r, name) for r in self.rows], like)

    def execute(self, forward, args, kwargs):
        plan = self.plan
        needs_attention = (plan.kind is StepKind.TOKEN or plan.capture_kv) and self.engine.attention_seam == "sdpa"
        with intercept_sdpa(self.attend) if needs_attention else contextlib.nullcontext():
            out = forward(*args, **kwargs)
        if plan.kind is StepKind.TOKEN and len(self.layers_seen) != len(self.engine.layers):
            raise RuntimeError(
                "X-Slim: token refresh could not reach the attention kernel of every layer "
                f"({len(self.layers_seen)}/{len(self.engine.layers)}); this attention backend is not supported. "
                "Disable the token level (levels without 'token')."
            )
        self.finish()
        return out

    # -- blocks ------------------------------------------------------------------------------------------
    def run_block(self, spec: EngineBlock, forward: Callable, args: tuple, kwargs: dict):
        kind, plan = self.plan.kind, self.plan
        first, last = spec.index == 0, spec.index == len(self.engine.blocks) - 1
        seg = plan.segment
        seg_first, seg_last = seg if seg is not None else (-1, -1)  # block indices are never -1
        in_segment = seg is not None and seg_first <= spec.index <= seg_last
        if kind is StepKind.FULL and not (first or last or plan.record_blocks or in_segment):
            self.run.stats.block_evals += len(self.rows)
            self.run.stats.block_calls += 1
            return forward(*args, **kwargs)  # nothing to observe in the middle of a plain full step
        if kind is StepKind.SKIP and not (first or last):
            out = spec.passthrough(args, kwargs)  # the middle of a skipped step: inputs pass through as they are
            if out is not None:
                return out
        call = spec.bind(args, kwargs)
        img, txt = call.img, call.txt
        if first:  # a block that adds to its input in place would change I under us
            self.I, self.n_img = (self.store.keep(img) if call.mutates_inputs else img), img.shape[1]
            if kind is StepKind.TOKEN:
                self.idx = select_tokens(
                    self._batch("delta_last", img), self._batch("delta_prev", img), self.engine.config.token_ratio
                )
                img = call.img = gather_tokens(img, self.idx)

        if kind is StepKind.SKIP:
            out_img = _add(img, self._skip_residual(img)) if first else img
            out_txt = txt
        elif kind is StepKind.BLOCK and in_segment:
            out_img, out_txt = self._reuse_segment(call, img, txt) if spec.index == seg_first else (img, txt)
        elif kind is StepKind.BLOCK and spec.index in plan.skip_blocks:
            out_img, out_txt = self._reuse_block(spec.index, img, txt)
        else:
            if in_segment and spec.index == seg_first:  # blocks may add to their inputs in place: copy
                self.segment_in = tuple(self.store.keep(t) for t in call.streams(img, txt, self.n_img))
            out_img, out_txt = self._compute_block(spec, call, forward, img, txt)
            if in_segment and spec.index == seg_last:
                self._record_segment(call, out_img, out_txt)

        if last:
            if kind is StepKind.TOKEN:  # back to full length: reused tokens keep their last output
                idx = self._token_subset()
                n_now = idx.shape[1]
                self.O = scatter_tokens(self._batch("last_out", out_img), idx, call.image_tokens(out_img, n_now))
                out_img = call.with_image_tokens(out_img, self.O, n_now)
            else:
                self.O = call.image_tokens(out_img, self.n_img)
        return call.pack(out_img, out_txt)

    def _token_subset(self) -> torch.Tensor:
        """The token subset of this token refresh; the first block chooses it, and blocks run in order."""
        assert self.idx is not None, "X-Slim: a token refresh reached a block before its first block"
        return self.idx

    def _skip_residual(self, like: torch.Tensor) -> torch.Tensor:
        """The residual a skipped step adds: the last computed one, or its extrapolation over sigma."""
        order = self.engine.config.forecast
        if order == 0:
            return self._batch("delta_last", like)
        cfg = self.engine.config
        return forecast_rows(self.rows, self.sigma, order, cfg.forecast_limit, like, cfg.forecast_gain)

    def _reuse_block(self, index: int, img, txt):
        parts = [row.block_residuals[index] for row in self.rows]
        out_img = _add(img, TensorStore.batch([p[0] for p in parts], img))
        if txt is None or parts[0][1] is None:
            return out_img, txt
        return out_img, _add(txt, TensorStore.batch([p[1] for p in parts], txt))

    def _record_segment(self, call: EngineBlockCall, out_img, out_txt) -> None:
        """Segment mode, the step before the last: keep each row's delta over the block range."""
        # the range's first block kept its inputs earlier in this call (blocks run in order; the kind is the call's)
        assert self.segment_in is not None, "X-Slim: the end of the recorded block range ran before its start"
        delta = range_delta(self.segment_in, call.streams(out_img, out_txt, self.n_img))
        for j in range(len(self.rows)):
            self.new_segment[j] = tuple(None if d is None else self.store.put(d[j : j + 1]) for d in delta)
        self.segment_in = None

    def _reuse_segment(self, call: EngineBlockCall, img, txt):
        """Segment mode, the last step: the range's output is its input plus the (transformed) recorded delta."""
        image, text = call.streams(img, txt, self.n_img)
        recorded = [_segment_delta(r) for r in self.rows]
        d_img = TensorStore.batch([d[0] for d in recorded], image)
        d_txt = None if text is None or recorded[0][1] is None else TensorStore.batch([d[1] for d in recorded], text)
        transform = self.engine.segment_transform
        if transform is not None:
            d_img, d_txt = transform(d_img, d_txt)
        out_image, out_text = replay_range((image, text), (d_img, d_txt), _add)
        return call.join_streams(out_image, out_text, self.n_img)

    def _compute_block(self, spec: EngineBlock, call: EngineBlockCall, forward: Callable, img, txt):
        plan, stats = self.plan, self.run.stats
        if plan.kind is StepKind.TOKEN:
            self.engine.adapter.gather_positions(call, self._token_subset(), self.n_img, self.positions)
        recording = plan.record_blocks
        if recording:  # blocks may update their inputs in place; keep what went in
            img, txt = self.store.keep(img), self.store.keep(txt)
        out_img, out_txt = call.call(forward)
        fraction = self._token_subset().shape[1] / self.n_img if plan.kind is StepKind.TOKEN else 1.0
        stats.block_evals += len(self.rows) * fraction
        stats.block_calls += 1
        if self.selectors is not None:  # made exactly when the plan records blocks
            change = (out_img.float() - img.float()).abs().mean(dim=(1, 2)).tolist()
            self.block_change.append(sum(change) / len(change))
            for j, e in enumerate(change):
                if self.selectors[j].skip(spec.index, e):
                    txt_res = (
                        None if txt is None or out_txt is None else self.store.put(out_txt[j : j + 1] - txt[j : j + 1])
                    )
                    self.new_residuals[j][spec.index] = (self.store.put(out_img[j : j + 1] - img[j : j + 1]), txt_res)
        return out_img, out_txt

    # -- attention: the host seam --------------------------------------------------------------------------
    @property
    def watches_attention(self) -> bool:
        """This plan needs the attention calls: a token refresh, or a step that keeps the image K/V."""
        return self.plan.kind is StepKind.TOKEN or self.plan.capture_kv

    def expect_attention(self, block: EngineBlock) -> None:
        """A host that calls the attention kernel itself: ``block`` runs now and makes its attention calls in
        the order of ``block.attention``; each is handed over with ``attend_next``."""
        if self.watches_attention:
            self._pending = [((block.index, j), layout) for j, layout in enumerate(block.attention)]

    @property
    def expects_attention(self) -> bool:
        """An announced attention call is still to come (``attend_next`` takes it)."""
        return bool(self._pending)

    def attend_next(self, sdpa: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """The next announced attention call, [B, heads, N, head_dim] tensors; ``sdpa(q, k, v, mask)`` is the
        host's kernel."""
        self.enter_attention(self._pending.pop(0))
        try:
            return self.attend(sdpa, q, k, v, mask)
        finally:
            self.leave_attention()

    def enter_attention(self, layer: tuple) -> None:
        """A host whose kernel the engine intercepts (``intercept_sdpa``): attention ``layer`` = (key, layout)
        starts; the kernel calls inside it are this layer's."""
        self._layer = layer

    def leave_attention(self) -> None:
        self._layer = None

    def attend(self, sdpa, q, k, v, attn_mask=None, *args, **kwargs):
        """Attention kernel hook: keep image K/V (capture) or attend a token subset to full-length K/V."""
        layer = self._layer
        if layer is None or layer[0] in self.layers_seen or k.ndim != 4:
            return sdpa(q, k, v, attn_mask, *args, **kwargs)
        key, layout = layer
        self.layers_seen.add(key)
        n_now = self._token_subset().shape[1] if self.plan.kind is StepKind.TOKEN else self.n_img
        txt_len = 0 if layout == IMG_ONLY else k.shape[2] - n_now  # the rest of the joint sequence is text
        k_txt, k_img = split_sequence(k, layout, txt_len, dim=2)
        v_txt, v_img = split_sequence(v, layout, txt_len, dim=2)
        if self.plan.kind is StepKind.TOKEN:
            index = self._token_subset()[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k_img = TensorStore.batch([r.kv[key][0] for r in self.rows], k).scatter(2, index, k_img)
            v_img = TensorStore.batch([r.kv[key][1] for r in self.rows], v).scatter(2, index, v_img)
            k, v = join_sequence(k_txt, k_img, layout, 2), join_sequence(v_txt, v_img, layout, 2)
            attn_mask = widen_mask(attn_mask, layout, txt_len, self.n_img)
        if self.plan.capture_kv or self.plan.kind is StepKind.TOKEN:
            for j in range(len(self.rows)):
                self.new_kv[j][key] = (
                    self.store.put(k_img[j : j + 1], copy=False),
                    self.store.put(v_img[j : j + 1], copy=False),
                )
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    # -- after the call ----------------------------------------------------------------------------------
    def finish(self) -> None:
        if self.I is None or self.O is None:
            return
        plan, kind, run = self.plan, self.plan.kind, self.run
        self._check_finite(self.O)
        n_computed = (
            self._token_subset().shape[1] if kind is StepKind.TOKEN else (0 if kind is StepKind.SKIP else self.n_img)
        )
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

    def _check_finite(self, out: torch.Tensor) -> None:
        """NaN or inf in the model's output make every change measure NaN: a controller then plans on nothing
        and the summary would describe a run that produced no image. Checked at the first and last step only
        (one host sync each), which catches a bad input latent and a blow-up on the way."""
        stats = self.run.stats
        if stats.non_finite_step is not None or self.step not in (0, stats.num_steps - 1):
            return
        if not bool(torch.isfinite(out).all()):
            stats.non_finite_step = self.step
            self.engine.warn_once(
                f"X-Slim: the model's output holds NaN or inf at step {self.step}; the result is invalid. Check the "
                "input latent and the model: X-Slim only reuses what the model computed."
            )

    def _track_change(self, row: RowState, delta: torch.Tensor) -> None:
        """Online controller: the relative L1 change of the step residual per unit sigma (the error of plain reuse
        grows with it) and, with forecasting, the relative L1 second divided difference over sigma (the error of
        a linear forecast grows with it). One host sync either way."""
        delta_last, sigma_last = row.delta_last, row.sigma_last
        # the caller checks delta_last; finish sets sigma_last together with it
        assert delta_last is not None and sigma_last is not None
        new, last = delta.float(), TensorStore.get(delta_last, delta).float()
        last_norm = last.abs().sum().clamp_min(1e-12)
        parts = [(new - last).abs().sum() / last_norm]
        curvature = False
        if self.engine.config.forecast >= 1 and row.delta_prev is not None and row.sigma_prev is not None:
            curvature = True
            prev = TensorStore.get(row.delta_prev, delta).float()
            h, h_prev = _nonzero(self.sigma - sigma_last), _nonzero(sigma_last - row.sigma_prev)
            second = ((new - last) / h - (last - prev) / h_prev).abs().sum() / _nonzero(
                abs(self.sigma - row.sigma_prev)
            )
            parts += [second, last_norm]
        values = torch.stack(parts).tolist() if curvature else [parts[0].item()]
        row.rate = values[0] / max(abs(sigma_last - self.sigma), 1e-8)
        if curvature:
            row.curvature = values[1] / max(values[2], 1e-12)

    def _record_profile_step(self) -> None:
        change = [_step_change(r) for r in self.rows]
        entry = self.run.profile_steps.setdefault(self.step, [0.0, [0.0] * len(self.block_change), 0])
        w = len(self.rows)
        entry[0] += sum(change)
        entry[1] = [a + b * w for a, b in zip(entry[1], self.block_change)]
        entry[2] += w
