"""X-Slim on a diffusers DiT: forward hooks on the model, its blocks and its attention modules turn the
model's calls into the engine's (``XSlimEngine.dispatch``, ``block_call``), restored exactly on removal."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable

import torch

from .adapters import Adapter, BlockSpec, ModelCall, adapter_for
from .config import XSlimConfig
from .engine import XSlimEngine
from .hooks import wrap_forward
from .profile import Profile


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

    blocks: list[BlockSpec]  # the diffusers adapters' blocks: the hooks go on their modules

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
            adapter,
            adapter.blocks(model),
            adapter.stack_sizes(model),
            config,
            profile,
            sigmas=sigmas,
            record_profile=record_profile,
            model_name=type(model).__name__,
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
        call = self.current_call
        if call is not None:
            call.enter_attention(layer)

    def _leave_attention(self, module, args, output):
        call = self.current_call
        if call is not None:
            call.leave_attention()

    def _block_forward(self, spec, forward, *args, **kwargs):
        return self.block_call(spec, forward, args, kwargs)

    def _block_only_input(self, name: str, forward, *args, **kwargs):
        return self.block_only_input((name, _shapes(args), _shapes(kwargs.values())), forward, args, kwargs)

    def _model_forward(self, forward, *args, **kwargs):
        if self.current_call is not None:
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


def run_cached(
    model: torch.nn.Module, config: XSlimConfig, profile: Profile | None, sigmas, sample: Callable[[], object]
):
    """Install X-Slim, run ``sample()`` once over ``sigmas``, take the hooks off; returns (output, stats)."""
    with XSlim(model, config, profile) as cache:
        with cache.run(sigmas):
            out = sample()
        return out, cache.stats
