"""SD3 / SD3.5 (MMDiT): one stack of joint blocks."""

from __future__ import annotations


from ..adapters.base import Adapter, BoundBlock, ModelCall
from ..tokens import IMG_FIRST, IMG_ONLY
from . import ActivationModel, FamilySpec, LatentGeometry, TrainerDefaults, model_times


class SD3Adapter(Adapter[BoundBlock]):
    """SD3 / SD3.5 MMDiT: one stack of joint blocks; SD3.5's dual-attention layers add an image-only attn2."""

    family = "sd3"
    display_name = "SD3 / SD3.5"
    model_classes = ("SD3Transformer2DModel",)
    stacks = (("joint", "transformer_blocks"),)
    block_outputs = {"joint": ("txt", "img")}
    attention = {"joint": (("attn", IMG_FIRST), ("attn2", IMG_ONLY))}

    def unsupported(self, call: ModelCall) -> str | None:
        if call.arguments.get("skip_layers") or call.arguments.get("block_controlnet_hidden_states") is not None:
            return "skip_layers / ControlNet residuals change the block sequence"
        return None


def velocity(module, x, sigma, cond, extra: dict):
    return module(hidden_states=x, encoder_hidden_states=cond.context, pooled_projections=cond.pooled,
                  timestep=model_times(sigma, x, SD3Adapter.time_scale), return_dict=False)[0]


SPEC = FamilySpec(
    SD3Adapter, velocity, LatentGeometry(channels=16, downscale=8, patch=2), text_tokens=77 + 256,
    # joint blocks: both streams in one attention, GELU(tanh) feed-forward on both streams
    activations=ActivationModel(double=(21.3, 16.4), outside=(3.5, 1.0), dual_extra=(15.2, 9.9)),
    reference_model="sd3.5-large", aliases=("sd3.5",),
    trainer=TrainerDefaults(batch_size=1, guidance_scale=4.5),
)
