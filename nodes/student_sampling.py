"""Sampling a 1.x student in ComfyUI: Euler in the k-diffusion convention ComfyUI's samplers use (the model
returns the denoised estimate), over the student's own sigmas, at CFG 1. ComfyUI is imported inside functions."""

from __future__ import annotations

import logging
import math

import torch

from .host import KEY, XSlimSetupError
from .pictures import is_demo_latent
from .student import too_few_sigmas

log = logging.getLogger("xslim")


@torch.no_grad()
def student_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic Euler as the student was trained: x <- x + (sigma' - sigma) v, v = (x - denoised) / sigma."""
    extra_args = extra_args or {}
    if len(sigmas) < 2:  # a student model refuses this earlier (StudentSettings.engine_for); another model here
        raise too_few_sigmas(len(sigmas))
    _refuse_guidance(model)
    _warn_on_foreign_sigmas(extra_args.get("model_options", {}), sigmas)
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (nxt - sigma) * (x - denoised) / sigma
    return x


GUIDANCE_SCALES = ("cfg", "cfg1", "cfg2")  # CFGGuider / PerpNegGuider: cfg; DualCFGGuider: cfg1 and cfg2


def _refuse_guidance(model) -> None:
    """Refuse a guider whose CFG is not 1. ComfyUI's KSAMPLER hands the sampler function a KSamplerX0Inpaint whose
    ``inner_model`` is the guider (comfy/samplers.py); CFGGuider-derived guiders keep their scales as attributes.
    A guider without such attributes (a custom one) is let through: we cannot tell, so we do not guess."""
    guider = getattr(model, "inner_model", None)
    scales = {name: getattr(guider, name) for name in GUIDANCE_SCALES if isinstance(getattr(guider, name, None), (int, float))}
    off = {name: value for name, value in scales.items() if not math.isclose(float(value), 1.0)}
    if off:
        found = ", ".join(f"{name} {value:g}" for name, value in off.items())
        raise XSlimSetupError(
            f"1.x Student Sampler: the guider ({type(guider).__name__}) has {found}; a 1.x student was distilled with "
            "guidance built in and samples at CFG 1; another CFG evaluates the model twice a step (the negative too) "
            "and changes the result. Use BasicGuider, or CFGGuider with cfg 1.")


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


def run_student(model, positive, latent: dict, seed: int, progress=None) -> torch.Tensor:
    """The student's latent for ``seed`` (KSampler's noise), with the interrupt check; ``progress(step, total)``
    is called per step (default: the node's own progress bar)."""
    import comfy.sample

    from .runner import progress_bar, sampling_inputs
    from .student import student_settings

    sigmas = torch.tensor(student_settings(model).header.sigmas, dtype=torch.float32)
    if progress is None:
        progress = progress_bar(len(sigmas) - 1).update_absolute
    samples, noise, callback = sampling_inputs(model, latent, seed, progress)

    # CFG 1: ComfyUI never evaluates the negative, so the positive stands in for it
    return comfy.sample.sample_custom(model, noise, 1.0, student_sampler(), sigmas, positive, positive, samples,
                                      noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed)


def demo_class_accuracy(images: list[torch.Tensor], latent: torch.Tensor, positive) -> list[tuple[int, int]] | None:
    """(correct, total) per column by the demo classifier when the graph samples the demo model with one of its
    classes; None otherwise (another model has no classifier here, and a made-up score would mislead)."""
    if not is_demo_latent(latent):
        return None
    from xslim_demo.classifier import load_classifier
    from xslim_demo.teacher import classes_path, default_weights_path
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
