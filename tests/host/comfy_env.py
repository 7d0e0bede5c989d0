"""A real ComfyUI for the host tests: imported in-process on the CPU, with tiny native models of each family.

ComfyUI is looked for at $COMFYUI_PATH, then at the fixed place /work/ComfyUI (CI passes no variables).
Our pack is loaded the way ComfyUI loads it: as a package (``comfyui_xslim``) with relative imports.
"""

from __future__ import annotations

import os
import sys

import torch

from xslim_core.packages import register_package

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXED_PLACE = "/work/ComfyUI"
COMFY = os.environ.get("COMFYUI_PATH") or FIXED_PLACE
PACK = "comfyui_xslim"


def import_comfy() -> str | None:
    """None when ComfyUI imports here, else the reason it does not."""
    if not os.path.isdir(os.path.join(COMFY, "comfy")):
        return f"no ComfyUI checkout at {COMFY} (set COMFYUI_PATH, or put one at {FIXED_PLACE})"
    if sys.path[0] != COMFY:  # ComfyUI's own `nodes` module must win over our `nodes/` package
        sys.path.insert(0, COMFY)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.sd  # noqa: F401
        import nodes  # noqa: F401
    except Exception as err:  # ComfyUI's requirements are not installed in this environment
        return f"ComfyUI at {COMFY} does not import in this environment ({err!r}); run `make test`, which builds .venv-host"
    return None


def load_pack():
    return register_package(PACK, REPO)


# Each family's model is built the way ComfyUI builds it from a file: its own detection reads a seed state dict
# (only the tensors detection looks at; their shapes set the width and depth), so every constructor argument of
# the host's version (FLUX's ``txt_ids_dims``, HunyuanVideo 1.5's ``vision_in_dim`` ...) comes from the host
# itself. SHRINK then overrides the few sizes some detections fix at full scale (0.3.64's FLUX is always
# 3072 wide; Qwen-Image's width is a constructor default): stable size arguments, never version-specific ones.
def _blocks(prefix: str, count: int, suffix: str, shape: tuple) -> dict:
    return {f"{prefix}.{i}.{suffix}": shape for i in range(count)}


SEEDS = {
    "flux": {"img_in.weight": (128, 64), "txt_in.weight": (128, 64), "vector_in.in_layer.weight": (128, 32),
             "guidance_in.in_layer.weight": (128, 256), "final_layer.linear.weight": (64, 128),
             **_blocks("double_blocks", 2, "img_attn.norm.key_norm.scale", (128,)),
             **_blocks("single_blocks", 3, "norm.key_norm.scale", (128,))},
    "sd3": {"x_embedder.proj.weight": (256, 16, 2, 2), "final_layer.linear.weight": (64, 256),
            "y_embedder.mlp.0.weight": (256, 64), "context_embedder.weight": (256, 64), "pos_embed": (1, 1024, 256),
            **_blocks("joint_blocks", 4, "context_block.attn.qkv.weight", (768, 256)),
            "joint_blocks.0.context_block.attn.ln_q.weight": (64,)},
    "wan": {"head.modulation": (1, 2, 128), "head.head.weight": (64, 128), "patch_embedding.weight": (128, 16, 1, 2, 2),
            **_blocks("blocks", 4, "ffn.0.weight", (256, 128))},
    "qwen_image": {"txt_norm.weight": (64,), "img_in.weight": (64, 64), **_blocks("transformer_blocks", 4, "img_mod.1.weight", (384, 64))},
    "hunyuan_video": {"img_in.proj.weight": (128, 16, 1, 2, 2), "final_layer.linear.weight": (64, 128),
                      "vector_in.in_layer.weight": (128, 768), "txt_in.input_embedder.weight": (128, 64),
                      "txt_in.individual_token_refiner.blocks.0.norm1.weight": (128,),
                      **_blocks("double_blocks", 2, "img_attn.qkv.weight", (384, 128)),
                      **_blocks("single_blocks", 3, "linear2.weight", (128, 640))},
    "lumina2": {"cap_embedder.1.weight": (64, 64), "noise_refiner.0.attention.k_norm.weight": (32,),
                **_blocks("layers", 2, "attention.qkv.weight", (192, 64))},
}
SHRINK = {
    "flux": dict(hidden_size=128, num_heads=1, context_in_dim=64),
    "sd3": {},
    "wan": dict(text_dim=64),
    "qwen_image": dict(patch_size=2, out_channels=16, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                       axes_dims_rope=[8, 12, 12]),
    "hunyuan_video": {},
    "lumina2": dict(dim=64, n_heads=2, n_kv_heads=2, multiple_of=16, cap_feat_dim=64, n_refiner_layers=1, axes_dims=[8, 12, 12],
                    axes_lens=[1, 64, 64]),
}
POOLED = {"flux": 32, "sd3": 64, "hunyuan_video": 768, "wan": 0, "qwen_image": 0}
VIDEO = ("hunyuan_video", "wan", "qwen_image")  # 5-D latents [B, C, T, H, W]


def native_model(family: str):
    """A ModelPatcher around ComfyUI's own model for ``family``, detected from its seed, tiny, in fp32 (weights
    not yet set: ``tiny_model`` fills them)."""
    import comfy.model_detection as detection
    import comfy.model_management as mm
    import comfy.model_patcher

    seed = {k: torch.zeros(shape) for k, shape in SEEDS[family].items()}
    unet_config = detection.detect_unet_config(seed, "")
    if unet_config is None:
        raise RuntimeError(f"ComfyUI at {COMFY} does not detect the {family} seed state dict: its detection changed")
    unet_config.update(SHRINK[family])
    cfg = detection.model_config_from_unet_config(unet_config, seed)
    cfg.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(cfg.get_model({}), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_model(family: str, seed: int = 0):
    """ComfyUI's own model class for ``family``, tiny, with random weights (buffers too)."""
    patcher = native_model(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in patcher.model.diffusion_model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.02 if t.ndim > 1 else 0.1) + (1.0 if "norm" in key or "scale" in key else 0.0) * (t.ndim == 1))
    return patcher


def conditioning(family: str, seed: int, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, POOLED[family], generator=g)} if POOLED[family] else {}
    if family == "flux":
        extra["guidance"] = 3.5
    return [[torch.randn(1, length, 64, generator=g), extra]]


def latent_shape(family: str, batch: int = 1, side: int = 16) -> tuple:
    return (batch, 16, 1, side, side) if family in VIDEO else (batch, 16, side, side)


def sample(model, family: str, *, steps=12, cfg=2.0, batch=1, side=16, seed=0, sampler="euler", scheduler="simple",
           positive=None, negative=None, denoise=1.0, latent=None, noise=None, callback=None):
    """Sampling the way KSampler does it (comfy.sample.sample), on fixed noise; returns the latent."""
    import comfy.sample

    shape = latent_shape(family, batch, side)
    if latent is not None:
        shape = tuple(latent.shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) if noise is None else noise
    latent = torch.zeros(noise.shape) if latent is None else latent
    positive = positive or conditioning(family, 1)
    negative = negative or conditioning(family, 2, length=4)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               denoise=denoise, disable_pbar=True, seed=seed, callback=callback)


def tiny_lumina2():
    """A model family X-Slim does not cover (ComfyUI's own Lumina 2 class), for the error path."""
    return native_model("lumina2")


def counting(model):
    """A clone whose every block counts the rows it really runs (a dit patch placed before any cache's wrappers)."""
    from comfyui_xslim.nodes.families import family_for

    counter = {"rows": 0}
    m = model.clone()
    for spec in family_for(m.model.diffusion_model).specs(m.model.diffusion_model):
        def patch(args, extra):
            counter["rows"] += args["img"].shape[0]
            return extra["original_block"](args)

        m.set_model_patch_replace(patch, "dit", *spec.patch)
    return m, counter
