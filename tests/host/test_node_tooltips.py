"""Every input of every node in the pack carries a tooltip (what the frontend shows on hover), and every list
input a default among its options (without one the node library's preview shows 'undefined'), read from the V3
schema ComfyUI itself builds for the node."""

from __future__ import annotations

import pytest


def test_every_input_of_every_node_has_a_tooltip(pack):
    from comfyui_xslim.nodes import node_classes

    missing = []
    for node in node_classes():
        schema = node.define_schema()
        assert schema.inputs is not None
        for item in schema.inputs:
            if not (getattr(item, "tooltip", None) or "").strip():
                missing.append(f"{schema.display_name}.{item.id}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_every_list_input_has_a_default_among_its_options(pack):
    from comfy_api.latest import io

    from comfyui_xslim.nodes import node_classes

    bad = []
    for node in node_classes():
        schema = node.define_schema()
        for item in schema.inputs or []:
            if isinstance(item, io.Combo.Input) and (not item.options or item.default not in item.options):
                bad.append(f"{schema.display_name}.{item.id}: default {item.default!r}, options {item.options!r}")
    assert not bad, bad


def test_the_train_node_offers_a_placeholder_and_refuses_it_when_no_model_is_there(pack, monkeypatch):
    import folder_paths

    from comfyui_xslim.nodes import train_nodes
    from comfyui_xslim.nodes.jobs import JobError

    monkeypatch.setattr(folder_paths, "get_filename_list", lambda folder: [])
    model = next(i for i in train_nodes.DistillTrain.define_schema().inputs if i.id == "model_name")
    assert model.options == [train_nodes.NO_MODEL] and model.default == train_nodes.NO_MODEL
    with pytest.raises(JobError, match="no model to distil: put a diffusion-model file .* into models/diffusion_models"):
        train_nodes._chosen_model(train_nodes.NO_MODEL, None)
