"""Sampling runs made by our own nodes (profile, compare), and what they measure. ComfyUI is imported
inside the functions, when a node runs."""

from __future__ import annotations

import time

import torch

from .host import KEY, RunReport, XSlimSettings, XSlimSetupError, install
from .pictures import demo_decode, is_demo_latent, is_demo_text_latent, latent_preview


def sample_latent(model, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                  positive, negative, progress=None) -> torch.Tensor:
    """KSampler's sampling (same noise for the same seed), with the interrupt check on every step."""
    import comfy.sample

    samples, noise, callback = sampling_inputs(model, latent, seed, progress)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed,
    )


class _NoBar:
    """Stands in for ComfyUI's progress bar where this ComfyUI has none."""

    total = current = 0

    def update(self, value) -> None:
        pass

    def update_absolute(self, value, total=None, preview=None) -> None:
        pass


def progress_bar(total: int):
    """ComfyUI's progress bar over ``total`` units of a node's own work (the node's bar in the UI and the jobs
    panel), found by feature detection; a stand-in that shows nothing where this ComfyUI has none."""
    import comfy.utils

    bar = getattr(comfy.utils, "ProgressBar", None)
    return bar(max(1, int(total))) if callable(bar) else _NoBar()


def sampling_inputs(model, latent: dict, seed: int, progress=None):
    """(latent samples, KSampler's noise for ``seed``, a step callback that checks ComfyUI's interrupt and reports
    ``progress(step, total)``) for one of our own sampling runs."""
    import comfy.model_management
    import comfy.sample

    samples = fix_empty_latent(model, latent)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))

    def callback(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is not None:
            progress(step + 1, total_steps)

    return samples, noise, callback


# what newer ComfyUI's empty-latent nodes put in the LATENT dict and core samplers hand on to
# fix_empty_latent_channels (so an empty latent made for another VAE ratio is resized to the model's)
LATENT_RATIO_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fix_empty_latent(model, latent: dict):
    """``comfy.sample.fix_empty_latent_channels`` as KSampler calls it: with the latent's downscale ratios where
    this ComfyUI takes them (newer versions; feature-detected by signature), else with the latent alone."""
    import inspect

    import comfy.sample

    fix = comfy.sample.fix_empty_latent_channels
    try:
        accepted = inspect.signature(fix).parameters
    except (TypeError, ValueError):  # a wrapped or builtin callable without a signature: the two-argument call
        accepted = {}
    extra = {k: latent[k] for k in LATENT_RATIO_KEYS if k in accepted and latent.get(k) is not None}
    return fix(model, latent["samples"], **extra)


def last_report(model) -> RunReport:
    settings = model.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(settings, XSlimSettings):
        raise XSlimSetupError("X-Slim: this model has no X-Slim cache. Connect the MODEL output of the X-Slim Cache node.")
    if not settings.reports:
        raise XSlimSetupError("X-Slim: no sampling run has finished with this model yet. Connect the sampler's LATENT output to this node.")
    return settings.reports[-1]


def cached_run(model, settings: XSlimSettings | None, sample) -> tuple[torch.Tensor, float, RunReport | None]:
    """(latent, seconds, report) of one run; ``settings`` None runs the model as it is."""
    patched = model if settings is None else install(model, settings)
    start = time.perf_counter()
    out = sample(patched)
    seconds = time.perf_counter() - start
    return out, seconds, (settings.reports[-1] if settings is not None and settings.reports else None)


def decode(samples: torch.Tensor, vae=None) -> torch.Tensor:
    """IMAGE for a latent: the VAE when given, the demo model's exact decoder for its latents, else a preview."""
    if vae is not None:
        images = vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images
    if is_demo_latent(samples) or is_demo_text_latent(samples):
        return demo_decode(samples)
    return latent_preview(samples)
