"""The demo teacher: architecture, class conditioning, and one weight file for diffusers and ComfyUI.

Why HunyuanVideo: ComfyUI's HunyuanVideo detection reads the width and depth from the weights (head dim 128),
so a narrow 12-block model loads through the stock UNETLoader; its SD3 detection ties width to depth
(hidden = 64 x depth), which makes a 12-block SD3 768 wide - too slow to train on two CPU cores. One frame
makes it an image model. ComfyUI hard-codes RoPE axes (16, 56, 56), theta 256, 2 token-refiner blocks,
MLP ratio 4, a 768-wide pooled vector and RMS q/k norms; the config below matches all of them.

The file is stored with ComfyUI's native key names (fused q/k/v, swapped final-norm halves) so UNETLoader
needs nothing from us; ``load_teacher`` maps it back to diffusers names. Class labels reach the model as a
learned text sequence and pooled vector per class (``demo_teacher.classes.safetensors``; the last row is the
CFG null class).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xslim_core.families import family_spec, model_times
from xslim_core.files import atomic_path

from .latents import COMFY_LATENT_SCALE

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FORMAT = "xslim-demo-teacher/1"
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")

ARCHITECTURE = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=1,
    attention_head_dim=128,
    num_layers=4,
    num_single_layers=8,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=False,
    text_embed_dim=64,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    image_condition_type=None,
)
TEXT_TOKENS = 4


def default_weights_path() -> str:
    return os.path.join(WEIGHTS_DIR, "demo_teacher.safetensors")


def build_model(architecture: dict | None = None) -> nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(**(architecture or ARCHITECTURE))


class ClassConditioner(nn.Module):
    """Per-class text tokens [L, text_dim] and pooled vector [768]; index len(CLASSES) is the null class."""

    def __init__(
        self, num_classes: int = len(CLASSES), tokens: int = TEXT_TOKENS, text_dim: int = 64, pooled: int = 768
    ):
        super().__init__()
        self.context = nn.Parameter(torch.randn(num_classes + 1, tokens, text_dim) * 0.5)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled) * 0.5)

    @property
    def null_class(self) -> int:
        return self.context.shape[0] - 1

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context[labels], self.pooled[labels]


def velocity(model: nn.Module, conditioner: ClassConditioner, x: torch.Tensor, sigma, labels: torch.Tensor):
    """The model's velocity (noise - x0) for latents ``x`` at ``sigma`` (float or [B]) given class labels."""
    context, pooled = conditioner(labels)
    b = x.shape[0]
    t = model_times(sigma, x, family_spec("hunyuan_video").time_scale)  # the demo is a HunyuanVideo-architecture model
    mask = torch.ones(b, context.shape[1], device=x.device)
    return model(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=context,
        encoder_attention_mask=mask,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


# -- diffusers <-> ComfyUI key names ------------------------------------------------------------------------
LINEAR = (("weight", "weight"), ("bias", "bias"))
SCALE = (("weight", "scale"),)


def key_rules(refiners: int, doubles: int, singles: int) -> list[tuple[str, tuple[str, ...], tuple, bool]]:
    """(ComfyUI prefix, diffusers prefixes concatenated on dim 0, suffix pairs, swap halves)."""
    r = [
        ("img_in.proj", ("x_embedder.proj",), LINEAR, False),
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), LINEAR, False),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), LINEAR, False),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), LINEAR, False),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), LINEAR, False),
        ("txt_in.input_embedder", ("context_embedder.proj_in",), LINEAR, False),
        ("txt_in.t_embedder.in_layer", ("context_embedder.time_text_embed.timestep_embedder.linear_1",), LINEAR, False),
        (
            "txt_in.t_embedder.out_layer",
            ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
            LINEAR,
            False,
        ),
        ("txt_in.c_embedder.in_layer", ("context_embedder.time_text_embed.text_embedder.linear_1",), LINEAR, False),
        ("txt_in.c_embedder.out_layer", ("context_embedder.time_text_embed.text_embedder.linear_2",), LINEAR, False),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), LINEAR, True),  # (scale, shift) vs (shift, scale)
        ("final_layer.linear", ("proj_out",), LINEAR, False),
    ]
    for i in range(refiners):
        s, d = f"context_embedder.token_refiner.refiner_blocks.{i}", f"txt_in.individual_token_refiner.blocks.{i}"
        r += [
            (f"{d}.norm1", (f"{s}.norm1",), LINEAR, False),
            (f"{d}.norm2", (f"{s}.norm2",), LINEAR, False),
            (f"{d}.self_attn.qkv", (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"), LINEAR, False),
            (f"{d}.self_attn.proj", (f"{s}.attn.to_out.0",), LINEAR, False),
            (f"{d}.mlp.0", (f"{s}.ff.net.0.proj",), LINEAR, False),
            (f"{d}.mlp.2", (f"{s}.ff.net.2",), LINEAR, False),
            (f"{d}.adaLN_modulation.1", (f"{s}.norm_out.linear",), LINEAR, False),
        ]
    for i in range(doubles):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        r += [
            (f"{d}.img_mod.lin", (f"{s}.norm1.linear",), LINEAR, False),
            (f"{d}.txt_mod.lin", (f"{s}.norm1_context.linear",), LINEAR, False),
            (f"{d}.img_attn.qkv", (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"), LINEAR, False),
            (
                f"{d}.txt_attn.qkv",
                (f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"),
                LINEAR,
                False,
            ),
            (f"{d}.img_attn.norm.query_norm", (f"{s}.attn.norm_q",), SCALE, False),
            (f"{d}.img_attn.norm.key_norm", (f"{s}.attn.norm_k",), SCALE, False),
            (f"{d}.txt_attn.norm.query_norm", (f"{s}.attn.norm_added_q",), SCALE, False),
            (f"{d}.txt_attn.norm.key_norm", (f"{s}.attn.norm_added_k",), SCALE, False),
            (f"{d}.img_attn.proj", (f"{s}.attn.to_out.0",), LINEAR, False),
            (f"{d}.txt_attn.proj", (f"{s}.attn.to_add_out",), LINEAR, False),
            (f"{d}.img_mlp.0", (f"{s}.ff.net.0.proj",), LINEAR, False),
            (f"{d}.img_mlp.2", (f"{s}.ff.net.2",), LINEAR, False),
            (f"{d}.txt_mlp.0", (f"{s}.ff_context.net.0.proj",), LINEAR, False),
            (f"{d}.txt_mlp.2", (f"{s}.ff_context.net.2",), LINEAR, False),
        ]
    for i in range(singles):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        r += [
            (f"{d}.linear1", (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"), LINEAR, False),
            (f"{d}.linear2", (f"{s}.proj_out",), LINEAR, False),
            (f"{d}.norm.query_norm", (f"{s}.attn.norm_q",), SCALE, False),
            (f"{d}.norm.key_norm", (f"{s}.attn.norm_k",), SCALE, False),
            (f"{d}.modulation.lin", (f"{s}.norm.linear",), LINEAR, False),
        ]
    return r


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _rules_for(architecture: dict):
    return key_rules(architecture["num_refiner_layers"], architecture["num_layers"], architecture["num_single_layers"])


def to_comfy(state: dict[str, torch.Tensor], architecture: dict) -> dict[str, torch.Tensor]:
    out, left = {}, dict(state)
    for comfy, parts, suffixes, swap in _rules_for(architecture):
        for ds, cs in suffixes:
            t = torch.cat([left.pop(f"{p}.{ds}") for p in parts], dim=0)
            out[f"{comfy}.{cs}"] = swap_halves(t) if swap else t
    if left:
        raise ValueError(f"unmapped diffusers keys: {sorted(left)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def from_comfy(
    state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], architecture: dict
) -> dict[str, torch.Tensor]:
    out = {}
    for comfy, parts, suffixes, swap in _rules_for(architecture):
        for ds, cs in suffixes:
            t = state[f"{comfy}.{cs}"]
            t = swap_halves(t) if swap else t
            sizes = [shapes[f"{p}.{ds}"][0] for p in parts]
            if t.shape[0] != sum(sizes):
                raise ValueError(
                    f"tensor {comfy}.{cs} has shape {tuple(t.shape)}, the architecture needs {sum(sizes)} rows"
                )
            for p, piece in zip(parts, t.split(sizes, dim=0)):
                out[f"{p}.{ds}"] = piece.contiguous()
    return out


# -- the file ----------------------------------------------------------------------------------------------
@dataclass
class DemoTeacher:
    model: nn.Module
    conditioner: ClassConditioner
    meta: dict

    def velocity_fn(self, labels: torch.Tensor):
        """velocity(x, sigma) for sampling; with a doubled batch (CFG) the first half is unconditional."""

        def fn(x, sigma):
            rows = (
                labels
                if x.shape[0] == labels.shape[0]
                else torch.cat([torch.full_like(labels, self.conditioner.null_class), labels])
            )
            return velocity(self.model, self.conditioner, x, sigma, rows)

        return fn


def classes_path(weights_path: str) -> str:
    """The class table of a teacher file: ``<name>.classes.safetensors`` next to it. A link to the shipped teacher
    elsewhere (the ComfyUI pack lists the teacher from a folder of its own, so that UNETLoader does not also list
    the table) gets the shipped table."""
    beside = weights_path.replace(".safetensors", ".classes.safetensors")
    shipped = default_weights_path()
    if (
        not os.path.exists(beside)
        and os.path.exists(weights_path)
        and os.path.exists(shipped)
        and os.path.samefile(weights_path, shipped)
    ):
        return shipped.replace(".safetensors", ".classes.safetensors")
    return beside


def save_teacher(path: str, model: nn.Module, conditioner: ClassConditioner, meta: dict) -> None:
    """Write the model (ComfyUI key names) and the class table, each atomically, with metadata."""
    architecture = dict(model.config)
    architecture = {k: (list(v) if isinstance(v, tuple) else v) for k, v in architecture.items() if k in ARCHITECTURE}
    header = {
        "format": FORMAT,
        "family": "hunyuan_video",
        "architecture": json.dumps(architecture),
        "latent_transform": "pad 28->32, x*2-1, pixel_unshuffle(4) -> [16, 1, 8, 8]; ComfyUI latent = this / "
        f"{COMFY_LATENT_SCALE}",
        "classes": json.dumps(CLASSES),
        "prediction": "flow velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise, timestep = sigma * 1000",
        **{k: str(v) for k, v in meta.items()},
    }
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    _atomic_save(to_comfy(state, architecture), path, header)
    table = {"context": conditioner.context.detach().float().cpu(), "pooled": conditioner.pooled.detach().float().cpu()}
    _atomic_save(table, classes_path(path), {"format": FORMAT + "/classes", "classes": json.dumps(CLASSES)})


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    with atomic_path(path, overwrite=True, mode=0o644) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _read(path: str) -> tuple[dict, dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Demo teacher weights {path} not found.")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for a damaged header or body
        raise ValueError(f"{path} is not a readable safetensors file ({err}).") from None


def load_teacher(path: str | None = None, dtype: torch.dtype = torch.float32) -> DemoTeacher:
    """Load the demo teacher into diffusers, checking the file against the architecture it declares."""
    path = path or default_weights_path()
    tensors, header = _read(path)
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an X-Slim demo teacher (format {header.get('format')!r}, expected {FORMAT!r})."
        )
    architecture = json.loads(header["architecture"])
    architecture["rope_axes_dim"] = tuple(architecture["rope_axes_dim"])
    with torch.device("meta"):
        template = build_model(architecture)
    shapes = {k: v.shape for k, v in template.state_dict().items()}
    try:
        state = from_comfy(tensors, shapes, architecture)
    except KeyError as err:
        raise ValueError(f"{path} does not match its declared architecture: missing tensor {err}.") from None
    except ValueError as err:
        raise ValueError(f"{path} does not match its declared architecture: {err}.") from None
    for key, shape in shapes.items():
        if state[key].shape != shape:
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, the architecture needs {tuple(shape)}."
            )
    model = build_model(architecture)
    model.load_state_dict(state, strict=True)
    if dtype != torch.float32:
        model.to(dtype)
    model.eval().requires_grad_(False)
    table, _ = _read(classes_path(path))
    conditioner = ClassConditioner(
        table["context"].shape[0] - 1, table["context"].shape[1], table["context"].shape[2], table["pooled"].shape[1]
    )
    conditioner.load_state_dict(table)
    conditioner.to(dtype).requires_grad_(False)
    return DemoTeacher(model, conditioner, header)
