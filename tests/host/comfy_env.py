"""A real ComfyUI for the host tests: imported in-process on the CPU, with tiny native models of each family.

ComfyUI is looked for at $COMFYUI_PATH, then at the fixed place /work/ComfyUI (CI passes no variables).
Our pack is loaded the way ComfyUI loads it: as a package (``comfyui_xslim``) with relative imports.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

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
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"), submodule_search_locations=[REPO])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


TINY = {
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                          mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=3, axes_dim=[4, 6, 6], theta=10000,
                          patch_size=2, qkv_bias=True, guidance_embed=True)),
    "sd3": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=4, adm_in_channels=64,
                        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}},
                        num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None, qk_norm="rms",
                        x_block_self_attn_layers=[], input_size=None)),
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, freq_dim=256, text_dim=64,
                              num_heads=2, num_layers=4, in_dim=16, out_dim=16)),
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                     axes_dims_rope=[8, 12, 12])),
    "hunyuan_video": ("HunyuanVideo", dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                                           vec_in_dim=768, context_in_dim=64, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2,
                                           depth_single_blocks=3, axes_dim=[16, 56, 56], theta=256, qkv_bias=True,
                                           guidance_embed=False, byt5=False, meanflow=False)),
}
POOLED = {"flux": 32, "sd3": 64, "hunyuan_video": 768, "wan": 0, "qwen_image": 0}
VIDEO = ("hunyuan_video", "wan", "qwen_image")  # 5-D latents [B, C, T, H, W]


def native_model(config_class: str, unet_config: dict):
    """A ModelPatcher around the model that ComfyUI's ``supported_models.<config_class>`` builds, in fp32."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = getattr(sm, config_class)(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(cfg.get_model({}), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_model(family: str, seed: int = 0):
    """ComfyUI's own model class for ``family``, tiny, with random weights (buffers too)."""
    patcher = native_model(*TINY[family])
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
    return native_model("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_layers=2,
                                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, multiple_of=16, cap_feat_dim=64,
                                        axes_dims=[8, 12, 12], axes_lens=[1, 64, 64]))


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
