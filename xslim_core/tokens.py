"""Token-level helpers: choosing tokens, gather/scatter, and full-length K/V attention for a token subset."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

# Where the image tokens sit in an attention layer's joint sequence.
IMG_ONLY, TXT_FIRST, IMG_FIRST = "img_only", "txt_first", "img_first"


def select_tokens(delta_last: torch.Tensor, delta_prev: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices [B, n] (ascending) of the image tokens whose step residual changed most between the last two
    computed steps. The reused count int((1 - ratio) * N) is fixed, so n is the same at every step."""
    n_img = delta_last.shape[1]
    n = n_img - int((1.0 - ratio) * n_img)
    score = (delta_last.float() - delta_prev.float()).abs().mean(dim=-1)
    return score.topk(max(n, 1), dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return base.scatter(1, idx[..., None].expand(-1, -1, base.shape[-1]), x)


def split_sequence(t: torch.Tensor, layout: str, txt_len: int, dim: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(text part, image part) of a joint sequence along ``dim``."""
    if layout == IMG_ONLY or txt_len == 0:
        return None, t
    size = t.shape[dim]
    if layout == TXT_FIRST:
        return t.narrow(dim, 0, txt_len), t.narrow(dim, txt_len, size - txt_len)
    return t.narrow(dim, size - txt_len, txt_len), t.narrow(dim, 0, size - txt_len)


def join_sequence(txt: torch.Tensor | None, img: torch.Tensor, layout: str, dim: int) -> torch.Tensor:
    if txt is None:
        return img
    return torch.cat([txt, img] if layout == TXT_FIRST else [img, txt], dim=dim)


def widen_mask(mask: torch.Tensor | None, layout: str, txt_len: int, n_img: int) -> torch.Tensor | None:
    """A key mask for the subset sequence, widened to the full image length (image tokens are never masked)."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    txt, _ = split_sequence(mask, layout, txt_len, dim=-1)
    shape = (*mask.shape[:-1], n_img)
    img = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return join_sequence(txt, img, layout, dim=-1)


_ROUTES = threading.local()  # this thread's stack of handlers
_INSTALL = {"count": 0, "original": None}
_INSTALL_LOCK = threading.Lock()


def _routed_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
    stack = getattr(_ROUTES, "stack", None)
    original = _INSTALL["original"]
    if not stack:  # another thread's call, or none of ours: plain attention
        return original(query, key, value, attn_mask, *args, **kwargs)
    return stack[-1](original, query, key, value, attn_mask, *args, **kwargs)


@contextlib.contextmanager
def intercept_sdpa(handler):
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through ``handler(original, q, k, v, ...)``
    for the duration of one X-Slim model call, in this thread only. diffusers' attention processors and its
    native dispatch backend look the function up at call time, so this reaches every attention layer without
    replacing any processor. The engine checks afterwards that every layer was reached. One dispatcher is
    installed while any thread needs it; each thread sees only its own handler, so concurrent runs never
    attend through each other's caches."""
    with _INSTALL_LOCK:
        if _INSTALL["count"] == 0:
            _INSTALL["original"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed_sdpa
        _INSTALL["count"] += 1
    stack = _ROUTES.__dict__.setdefault("stack", [])
    stack.append(handler)
    try:
        yield
    finally:
        stack.pop()
        with _INSTALL_LOCK:
            _INSTALL["count"] -= 1
            if _INSTALL["count"] == 0:
                F.scaled_dot_product_attention = _INSTALL["original"]
