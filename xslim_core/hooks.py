"""Instance-``forward`` wrappers that compose with everyone else's.

A wrapper is installed on top of whatever ``module.forward`` is now (the class method, or another party's
instance forward such as diffusers' HookRegistry, a second cache, an offloading hook). Removing it restores
exactly what was there when it is still the outermost forward; when another party has wrapped on top of it
since, it stays in their chain as a pass-through, so neither their wrapper nor anything underneath is lost.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn

_MISSING = object()


def wrap_forward(module: nn.Module, handler: Callable) -> Callable[[], None]:
    """Route ``module.forward(*a, **k)`` through ``handler(inner_forward, *a, **k)``; returns the undo."""
    previous = module.__dict__.get("forward", _MISSING)
    inner = module.forward
    active = [True]

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not active[0]:
            return inner(*args, **kwargs)
        return handler(inner, *args, **kwargs)

    module.forward = forward

    def undo() -> None:
        active[0] = False
        if module.__dict__.get("forward") is not forward:
            return  # someone wrapped on top of us since: stay in their chain, as a pass-through
        if previous is _MISSING:
            del module.__dict__["forward"]
        else:
            module.forward = previous

    return undo
