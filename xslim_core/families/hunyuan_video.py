"""HunyuanVideo: double- then single-stream blocks; RoPE over image tokens; a text padding mask.

Latent (``teacher_options.latent_shape``, one sample): ``[16, (F-1)/4+1, H/8, W/8]`` for F frames of H x W pixels
(the transformer patches it 1x2x2 itself), ``extra["guidance"]`` the embedded guidance; 33 frames of 720x1280 are
``[16, 9, 90, 160]``. The demo teacher is of this family: ``[16, 1, 8, 8]``.
"""

from __future__ import annotations

import torch

from ..adapters.base import Adapter, BoundBlock
from ..tokens import IMG_FIRST
from . import ActivationModel, FamilySpec, LatentGeometry, TrainerDefaults, model_times

EMBEDDED_GUIDANCE = 6.0  # HunyuanVideo's guidance input when the caller gives none (as its pipeline)


class HunyuanVideoAdapter(Adapter[BoundBlock]):
    """HunyuanVideo: double- then single-stream blocks; RoPE over image tokens; a text padding mask."""

    family = "hunyuan_video"
    display_name = "HunyuanVideo"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    stacks = (("double", "transformer_blocks"), ("single", "single_transformer_blocks"))
    block_outputs = {"double": ("img", "txt"), "single": ("img", "txt")}
    attention = {"double": (("attn", IMG_FIRST),), "single": (("attn", IMG_FIRST),)}
    per_row_positions = True
    block_only_inputs = ("context_embedder", "rope")  # the token refiner is a small transformer of its own

    def gather_positions(self, block: BoundBlock, idx: torch.Tensor, n_img: int, memo: dict) -> None:
        for name in ("image_rotary_emb", "freqs_cis"):  # single blocks / double blocks
            rope = block.arguments.get(name)
            if rope is not None:
                if id(rope) not in memo:
                    memo[id(rope)] = (rope, tuple(t.index_select(0, idx[0].to(t.device)) for t in rope))
                block.arguments[name] = memo[id(rope)][1]
        mask = block.arguments.get("attention_mask")
        if mask is not None:  # [B, 1, 1, N_img + N_txt], image first
            if id(mask) not in memo:
                img_part = torch.ones((*mask.shape[:-1], idx.shape[1]), dtype=mask.dtype, device=mask.device)
                memo[id(mask)] = (mask, torch.cat([img_part, mask[..., n_img:]], dim=-1))
            block.arguments["attention_mask"] = memo[id(mask)][1]


def velocity(module, x, sigma, cond, extra: dict):
    mask = cond.mask if cond.mask is not None else torch.ones(cond.context.shape[:2], device=x.device)
    t = model_times(sigma, x, HunyuanVideoAdapter.time_scale)
    guidance = (
        torch.full_like(t, extra.get("guidance", EMBEDDED_GUIDANCE) * 1000.0) if module.config.guidance_embeds else None
    )
    return module(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=cond.context,
        encoder_attention_mask=mask,
        pooled_projections=cond.pooled,
        guidance=guidance,
        return_dict=False,
    )[0]


def text_encode(pipe, prompts: list[str], device, max_tokens: int | None):
    """HunyuanVideoPipeline.encode_prompt: Llama sequence [B, L, 4096] with its padding mask [B, L], CLIP pooled
    [B, 768]."""
    more = {} if max_tokens is None else {"max_sequence_length": max_tokens}
    context, pooled, mask = pipe.encode_prompt(prompts, prompt_2=None, device=device, **more)
    return context, pooled, mask


SPEC = FamilySpec(
    HunyuanVideoAdapter,
    velocity,
    LatentGeometry(channels=16, downscale=8, patch=2, temporal_downscale=4),
    text_tokens=256,
    embedded_guidance=EMBEDDED_GUIDANCE,
    activations=ActivationModel(double=(25.8, 18.7), single=(22.3, 18.3), outside=(5.5, 1.0)),
    reference_model="hunyuan-video",
    trainer=TrainerDefaults(batch_size=1, guidance_scale=1.0),  # guidance-distilled, as FLUX
    text_encode=text_encode,
)
