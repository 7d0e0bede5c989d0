"""Every input of every node in the pack carries a tooltip (what the frontend shows on hover), read from the V3
schema ComfyUI itself builds for the node."""

from __future__ import annotations


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
