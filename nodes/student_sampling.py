"""Sampling a 1.x student in ComfyUI: Euler in the k-diffusion convention ComfyUI's samplers use (the model
returns the denoised estimate), over the student's own sigmas, at CFG 1. ComfyUI is imported inside functions."""

from __future__ import annotations

import logging

import torch

from .host import KEY
from .pictures import is_demo_latent

log = logging.getLogger("xslim")


@torch.no_grad()
def student_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic Euler as the student was trained: x <- x + (sigma' - sigma) v, v = (x - denoised) / sigma."""
    extra_args = extra_args or {}
    _warn_on_foreign_sigmas(extra_args.get("model_options", {}), sigmas)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (nxt - sigma) * (x - denoised) / sigma
    return x


def _warn_on_foreign_sigmas(model_options: dict, sigmas: torch.Tensor) -> None:
    settings = model_options.get("transformer_options", {}).get(KEY)
    header = getattr(settings, "header", None)
    if header is None:
        return
    want = torch.tensor(header.sigmas, dtype=torch.float64)
    got = sigmas.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4):
        log.warning("1.x student: sampling over sigmas %s, but the student was distilled for %s; quality will suffer. "
                    "Use 1.x Student Sigmas.", [round(float(s), 4) for s in got], header.sigmas)


def student_sampler():
    import comfy.samplers

    return comfy.samplers.KSAMPLER(student_euler)


def run_student(model, positive, latent: dict, seed: int) -> torch.Tensor:
    """The student's latent for ``seed`` (KSampler's noise), with a progress bar and the interrupt check."""
    import comfy.sample
    import comfy.utils

    from .runner import sampling_inputs
    from .student import student_settings

    sigmas = torch.tensor(student_settings(model).header.sigmas, dtype=torch.float32)
    bar = comfy.utils.ProgressBar(len(sigmas) - 1)
    samples, noise, callback = sampling_inputs(model, latent, seed, bar.update_absolute)

    # CFG 1: ComfyUI never evaluates the negative, so the positive stands in for it
    return comfy.sample.sample_custom(model, noise, 1.0, student_sampler(), sigmas, positive, positive, samples,
                                      noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed)


def demo_class_accuracy(images: list[torch.Tensor], latent: torch.Tensor, positive) -> list[tuple[int, int]] | None:
    """(correct, total) per column by the demo classifier when the graph samples the demo model with one of its
    classes; None otherwise (another model has no classifier here, and a made-up score would mislead)."""
    if not is_demo_latent(latent):
        return None
    from ..xslim_lab.demo_model.classifier import load_classifier
    from ..xslim_lab.demo_model.teacher import classes_path, default_weights_path
    from safetensors import safe_open

    with safe_open(classes_path(default_weights_path()), framework="pt") as f:
        table = f.get_tensor("context")
    context = positive[0][0].float()
    matches = [i for i in range(len(table) - 1) if context.shape[1:] == table[i].shape and torch.allclose(context[0], table[i], atol=1e-5)]
    if not matches:
        return None
    classifier, _ = load_classifier()
    out = []
    with torch.no_grad():
        for batch in images:
            grey = batch[..., 0].unsqueeze(1).float()  # [B, 1, 28, 28] in [0, 1]
            predicted = classifier.logits(grey).argmax(1)
            out.append((int((predicted == matches[0]).sum()), batch.shape[0]))
    return out
