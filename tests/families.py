"""Tiny random-weight diffusers DiTs of every supported family, with a velocity function for sampling.

Each harness builds a real diffusers model and calls it exactly as its pipeline would (timestep units,
RoPE ids, masks, guidance), with a batch of conditioning rows that CFG doubles as [uncond; cond].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Family:
    name: str
    model: torch.nn.Module
    latent_shape: tuple  # without batch
    velocity: Callable  # (model, x, sigma, prompt index per row) -> velocity; prompt 0 is unconditional

    def velocity_fn(self, prompts: list[int]):
        """Velocity for a batch whose row i uses prompt ``prompts[i]`` (CFG: uncond rows use prompt 0)."""

        def fn(x, sigma):
            rows = prompts if x.shape[0] == len(prompts) else [0] * len(prompts) + prompts
            return self.velocity(self.model, x, sigma, torch.tensor(rows))

        return fn


def _seeded(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g


def sd3(num_layers: int = 8, dual: bool = False) -> Family:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16,
        out_channels=4, pos_embed_max_size=32,
        dual_attention_layers=tuple(range(num_layers)) if dual else (), qk_norm="rms_norm" if dual else None,
    ).eval()
    g = _seeded(1)
    ctx, pooled = torch.randn(4, 7, 32, generator=g), torch.randn(4, 16, generator=g)

    def velocity(m, x, sigma, rows):
        t = torch.full((x.shape[0],), sigma * 1000.0)
        return m(hidden_states=x, encoder_hidden_states=ctx[rows], pooled_projections=pooled[rows], timestep=t,
                 return_dict=False)[0]

    return Family("sd3.5" if dual else "sd3", model, (4, 16, 16), velocity)


def flux(num_layers: int = 2, num_single: int = 6) -> Family:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    g = _seeded(2)
    ctx, pooled = torch.randn(4, 6, 32, generator=g), torch.randn(4, 32, generator=g)
    side = 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
    img_ids = img_ids.reshape(-1, 3).float()
    txt_ids = torch.zeros(6, 3)

    def velocity(m, x, sigma, rows):
        t = torch.full((x.shape[0],), float(sigma))
        return m(hidden_states=x, encoder_hidden_states=ctx[rows], pooled_projections=pooled[rows], timestep=t,
                 img_ids=img_ids[: x.shape[1]], txt_ids=txt_ids, return_dict=False)[0]

    return Family("flux", model, (side * side, 16), velocity)


def hunyuan_video(num_layers: int = 2, num_single: int = 6) -> Family:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=num_layers,
        num_single_layers=num_single, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    g = _seeded(3)
    ctx, pooled = torch.randn(4, 5, 16, generator=g), torch.randn(4, 8, generator=g)
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0  # the unconditional prompt is padded: exercises the text mask

    def velocity(m, x, sigma, rows):
        b = x.shape[0]
        return m(hidden_states=x, timestep=torch.full((b,), sigma * 1000.0), encoder_hidden_states=ctx[rows],
                 encoder_attention_mask=mask[rows], pooled_projections=pooled[rows],
                 guidance=torch.full((b,), 3500.0), return_dict=False)[0]

    return Family("hunyuan_video", model, (4, 1, 8, 8), velocity)


def dit(num_layers: int = 8) -> Family:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        patch_size=2, sample_size=16, num_embeds_ada_norm=3, norm_type="ada_norm_zero",
    ).eval()
    # adaLN-zero starts as identity blocks; give the random model real block updates
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)

    def velocity(m, x, sigma, rows):
        labels = torch.where(rows == 0, torch.tensor(3), rows - 1)  # prompt 0 = the CFG null label
        return m(hidden_states=x, timestep=torch.full((x.shape[0],), sigma * 1000.0), class_labels=labels,
                 return_dict=False)[0]

    return Family("dit", model, (4, 16, 16), velocity)


BUILDERS = {"sd3": sd3, "sd3.5": lambda: sd3(dual=True), "flux": flux, "hunyuan_video": hunyuan_video, "dit": dit}
