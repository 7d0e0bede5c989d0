"""Random-weight diffusers DiTs for speed measurements (random weights say nothing about image quality)."""

from __future__ import annotations

import torch


def random_sd3(layers: int = 12, width: int = 256, side: int = 32, seed: int = 0):
    """A random-weight SD3 MMDiT and a velocity function (CFG rows: [uncond; cond])."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    heads = width // 64
    model = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=heads, caption_projection_dim=width, joint_attention_dim=64,
        pooled_projection_dim=64, out_channels=16, pos_embed_max_size=side,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    context, pooled = torch.randn(2, 16, 64, generator=g), torch.randn(2, 64, generator=g)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        b = x.shape[0]
        rows = torch.arange(b) % 2 if b == 2 else torch.ones(b, dtype=torch.long)
        return model(hidden_states=x, encoder_hidden_states=context[rows], pooled_projections=pooled[rows],
                     timestep=torch.full((b,), sigma * 1000.0), return_dict=False)[0]

    return model, velocity, (1, 16, side, side)


def random_flux(heads: int = 24, double: int = 19, single: int = 38, side: int = 64, text: int = 512,
                device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight FLUX transformer (defaults: FLUX.1-dev's architecture at 1024x1024) and a velocity
    function for guidance-distilled sampling (batch 1, no CFG)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
            num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=[16, 56, 56],
        ).to(dtype).eval()
        g = torch.Generator(device).manual_seed(seed + 1)
        context = torch.randn(1, text, 4096, generator=g, device=device, dtype=dtype)
        pooled = torch.randn(1, 768, generator=g, device=device, dtype=dtype)
        rows, cols = torch.meshgrid(torch.arange(side // 2.0), torch.arange(side // 2.0), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
        txt_ids = torch.zeros(text, 3)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full_like(t, 3.5), return_dict=False)[0]

    return model, velocity, (1, (side // 2) ** 2, 64)
