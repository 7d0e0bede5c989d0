"""Model adapters, one small class per family, and the lookup by model class."""

from __future__ import annotations

from .base import Adapter, BlockSpec, BoundBlock, ModelCall
from .diffusers_models import ADAPTERS, DiTAdapter, FluxAdapter, HunyuanVideoAdapter, SD3Adapter


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model) -> Adapter:
    """The adapter for ``model``'s class (or a base class of it); a clear error for anything else."""
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.model_classes:
                return adapter()
    raise TypeError(
        f"X-Slim does not support {type(model).__name__}. Supported models: {', '.join(supported_models())}."
    )


__all__ = [
    "Adapter", "BlockSpec", "BoundBlock", "ModelCall", "SD3Adapter", "FluxAdapter", "HunyuanVideoAdapter",
    "DiTAdapter", "adapter_for", "supported_models",
]
