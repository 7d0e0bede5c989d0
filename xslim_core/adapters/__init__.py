"""The block abstraction (``base``) and the lookup of a model's adapter. Each family's adapter lives in its family
module (``xslim_core/families/``), the one place that says what a family is."""

from __future__ import annotations

from .base import Adapter, BlockSpec, BoundBlock, ModelCall


def _adapters() -> list[type[Adapter]]:
    from ..families import REGISTRY  # the family modules import .base: looked up when asked, not at import

    return [spec.adapter for spec in REGISTRY.values()]


def supported_models() -> list[str]:
    return [name for adapter in _adapters() for name in adapter.model_classes]


def adapter_for(model) -> Adapter:
    """The adapter for ``model``'s class (or a base class of it); a clear error for anything else."""
    for cls in type(model).__mro__:
        for adapter in _adapters():
            if cls.__name__ in adapter.model_classes:
                return adapter()
    raise TypeError(
        f"X-Slim does not support {type(model).__name__}. Supported models: {', '.join(supported_models())}."
    )


__all__ = ["Adapter", "BlockSpec", "BoundBlock", "ModelCall", "adapter_for", "supported_models"]
