"""Every ``comfy_api.latest`` name the pack uses exists in this ComfyUI, with every keyword the pack passes.

The node modules resolve ``io.X.Input(...)`` while they are imported, so one renamed or dropped name (newer
ComfyUI's ``io`` is a curated public subset) would stop the whole pack from loading with an error far from its
cause. This test reads the pack's own source (no node runs, no model loads) and names each missing piece."""

from __future__ import annotations

import ast
import inspect
import os

import comfy_env as ce

NODES = os.path.join(ce.REPO, "nodes")


def _io_uses() -> dict[tuple[str, ...], set[str]]:
    """(attribute path under ``io``) -> keywords passed where it is called, over every file that imports ``io``."""
    uses: dict[tuple[str, ...], set[str]] = {}
    for name in sorted(os.listdir(NODES)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(NODES, name)) as f:
            tree = ast.parse(f.read(), name)
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            path, inner = [], node
            while isinstance(inner, ast.Attribute):
                path.insert(0, inner.attr)
                inner = inner.value
            if not (isinstance(inner, ast.Name) and inner.id == "io"):
                continue
            keywords = uses.setdefault(tuple(path), set())
            if id(node) in calls:
                keywords |= {k.arg for k in calls[id(node)].keywords if k.arg}
    return uses


def test_every_io_name_and_keyword_the_pack_uses_exists_in_this_comfyui(pack):
    from comfy_api.latest import io

    uses = _io_uses()
    assert ("Int", "Input") in uses and ("Schema",) in uses and ("Custom",) in uses  # the scan found the real uses
    missing, refused = [], []
    for path, keywords in sorted(uses.items()):
        obj = io
        for part in path:
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append("io." + ".".join(path))
                break
        else:
            if keywords and callable(obj):
                params = inspect.signature(obj).parameters
                takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
                refused += [f"io.{'.'.join(path)}({k}=...)" for k in sorted(keywords) if k not in params and not takes_any]
    assert not missing, f"comfy_api.latest.io lacks: {missing}"
    assert not refused, f"keywords this ComfyUI does not take: {refused}"
    print(f"{len(uses)} io names checked")


def test_empty_latent_ratios_reach_comfyui_only_where_it_takes_them(pack, monkeypatch):
    """Newer ComfyUI's ``fix_empty_latent_channels(model, latent, downscale_ratio_spacial=None,
    downscale_ratio_temporal=None)`` resizes an empty latent made for another VAE ratio; 0.3.64's takes two
    arguments. The pack's sampling runs pass the LATENT dict's ratios by signature, never by version."""
    import comfy.sample
    import torch

    from comfyui_xslim.nodes.runner import fix_empty_latent

    latent = {"samples": torch.zeros(1, 4, 8, 8), "downscale_ratio_spacial": 16, "downscale_ratio_temporal": 4}
    calls = []

    def newer(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        calls.append(("newer", downscale_ratio_spacial, downscale_ratio_temporal))
        return latent_image

    def spatial_only(model, latent_image, downscale_ratio_spacial=None):
        calls.append(("spatial only", downscale_ratio_spacial))
        return latent_image

    def old(model, latent_image):
        calls.append(("old",))
        return latent_image

    for fake in (newer, spatial_only, old):
        monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", fake)
        assert fix_empty_latent("model", latent) is latent["samples"]
    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", newer)
    fix_empty_latent("model", {"samples": latent["samples"]})  # a latent from 0.3.64's nodes: no ratios to pass
    assert calls == [("newer", 16, 4), ("spatial only", 16), ("old",), ("newer", None, None)]
