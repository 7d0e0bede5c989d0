"""FLUX: double-stream blocks, then single-stream blocks; RoPE over [text; image].

Latent (``teacher_options.latent_shape``, one sample): packed tokens ``[(H/16)*(W/16), in_channels]``, each token a
2x2 patch of the VAE's 16 channels (``in_channels`` 64 for FLUX.1), with ``extra["grid"] = [H/16, W/16]`` for the
image RoPE ids and ``extra["guidance"]`` the embedded guidance; 1024x1024 is ``[4096, 64]`` on a 64x64 grid.
"""

from __future__ import annotations

import torch

from ..adapters.base import Adapter, BoundBlock, ModelCall
from ..tokens import TXT_FIRST
from . import ActivationModel, FamilySpec, LatentGeometry, TrainerDefaults, model_times

EMBEDDED_GUIDANCE = 3.5  # FLUX.1-dev's guidance input when the caller gives none (as its pipeline)


class FluxAdapter(Adapter[BoundBlock]):
    """FLUX: double-stream blocks, then single-stream blocks; RoPE over [text; image]."""

    family = "flux"
    display_name = "FLUX"
    model_classes = ("FluxTransformer2DModel",)
    stacks = (("double", "transformer_blocks"), ("single", "single_transformer_blocks"))
    block_outputs = {"double": ("txt", "img"), "single": ("txt", "img")}
    attention = {"double": (("attn", TXT_FIRST),), "single": (("attn", TXT_FIRST),)}
    time_scale = 1.0  # the pipeline passes sigma; the model scales by 1000 internally
    unbatched_inputs = ("img_ids", "txt_ids")
    per_row_positions = True
    block_only_inputs = ("context_embedder", "pos_embed")

    def gather_positions(self, block: BoundBlock, idx: torch.Tensor, n_img: int, memo: dict) -> None:
        rope = block.arguments.get("image_rotary_emb")
        if rope is None:
            return
        if id(rope) not in memo:
            txt = block.txt
            assert txt is not None, "X-Slim: FLUX blocks always take the text stream"  # block_txt_arg is set
            txt_len = txt.shape[1]
            rows = torch.cat([torch.arange(txt_len, device=idx.device), txt_len + idx[0]])
            memo[id(rope)] = (
                rope,
                tuple(t.index_select(0, rows.to(t.device)) for t in rope),
            )  # rope kept alive: id stays unique
        block.arguments["image_rotary_emb"] = memo[id(rope)][1]

    def unsupported(self, call: ModelCall) -> str | None:
        if (
            call.arguments.get("controlnet_block_samples") is not None
            or call.arguments.get("controlnet_single_block_samples") is not None
        ):
            return "ControlNet residuals are added between blocks"
        return None


def velocity(module, x, sigma, cond, extra: dict):
    """x: packed image tokens [B, N, C]; positions from ``extra["grid"]`` (h, w) of the token grid."""
    t = model_times(sigma, x, FluxAdapter.time_scale)  # diffusers' FLUX scales by 1000 inside
    h, w = extra["grid"]
    rows, cols = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x.dtype)
    txt_ids = torch.zeros(cond.context.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = torch.full_like(t, extra.get("guidance", EMBEDDED_GUIDANCE)) if module.config.guidance_embeds else None
    return module(
        hidden_states=x,
        encoder_hidden_states=cond.context,
        pooled_projections=cond.pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


def text_encode(pipe, prompts: list[str], device, max_tokens: int | None):
    """FluxPipeline.encode_prompt: T5 sequence [B, L, 4096], CLIP pooled [B, 768]; no mask (the pipeline passes none)."""
    more = {} if max_tokens is None else {"max_sequence_length": max_tokens}
    context, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, **more)
    return context, pooled, None


SPEC = FamilySpec(
    FluxAdapter,
    velocity,
    LatentGeometry(channels=16, downscale=8, patch=2, packed=True),
    text_tokens=512,
    embedded_guidance=EMBEDDED_GUIDANCE,
    activations=ActivationModel(double=(25.8, 18.5), single=(21.3, 17.3), outside=(3.6, 1.0)),
    reference_model="flux.1-dev",
    # guidance-distilled: guidance is an input of the model, so CFG on top would guide twice
    trainer=TrainerDefaults(batch_size=1, guidance_scale=1.0),
    text_encode=text_encode,
)
