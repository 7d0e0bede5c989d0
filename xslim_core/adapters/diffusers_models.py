"""Adapters for diffusers' DiTs. Each is a table of names plus, for RoPE models, how to subset positions."""

from __future__ import annotations

import torch

from ..tokens import IMG_FIRST, IMG_ONLY, TXT_FIRST
from .base import Adapter, BoundBlock, ModelCall


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
            memo[id(rope)] = (rope, tuple(t.index_select(0, rows.to(t.device)) for t in rope))  # rope kept alive: id stays unique
        block.arguments["image_rotary_emb"] = memo[id(rope)][1]

    def unsupported(self, call: ModelCall) -> str | None:
        if call.arguments.get("controlnet_block_samples") is not None or call.arguments.get(
            "controlnet_single_block_samples"
        ) is not None:
            return "ControlNet residuals are added between blocks"
        return None


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


class DiTAdapter(Adapter[BoundBlock]):
    """DiT (class-conditional, adaLN-zero): one stack of image-only blocks; positions are added at embedding."""

    family = "dit"
    display_name = "DiT"
    model_classes = ("DiTTransformer2DModel",)
    stacks = (("main", "transformer_blocks"),)
    txt_arg = None
    block_txt_arg = None
    block_outputs = {"main": ("img",)}
    attention = {"main": (("attn1", IMG_ONLY),)}


ADAPTERS: tuple[type[Adapter], ...] = (SD3Adapter, FluxAdapter, HunyuanVideoAdapter, DiTAdapter)
