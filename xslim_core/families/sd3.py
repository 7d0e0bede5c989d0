"""SD3 / SD3.5 (MMDiT): one stack of joint blocks.

Latent (``teacher_options.latent_shape``, one sample): ``[16, H/8, W/8]``, the VAE latent unpacked (the
transformer patches it 2x2 itself); 1024x1024 is ``[16, 128, 128]``.
"""

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
    return module(
        hidden_states=x,
        encoder_hidden_states=cond.context,
        pooled_projections=cond.pooled,
        timestep=model_times(sigma, x, SD3Adapter.time_scale),
        return_dict=False,
    )[0]


def text_encode(pipe, prompts: list[str], device, max_tokens: int | None):
    """StableDiffusion3Pipeline.encode_prompt without CFG: [CLIP-L; CLIP-G padded; T5] [B, 77 + L, 4096], the two
    CLIPs' pooled vectors [B, 2048]; no mask."""
    more = {} if max_tokens is None else {"max_sequence_length": max_tokens}
    context, _, pooled, _ = pipe.encode_prompt(
        prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False, **more
    )
    return context, pooled, None


SPEC = FamilySpec(
    SD3Adapter,
    velocity,
    LatentGeometry(channels=16, downscale=8, patch=2),
    text_tokens=77 + 256,
    # joint blocks: both streams in one attention, GELU(tanh) feed-forward on both streams
    activations=ActivationModel(double=(21.3, 16.4), outside=(3.5, 1.0), dual_extra=(15.2, 9.9)),
    reference_model="sd3.5-large",
    aliases=("sd3.5",),
    trainer=TrainerDefaults(batch_size=1, guidance_scale=4.5),
    text_encode=text_encode,
)
