"""Every registered model family is complete and consistent across the layers that read it: the engine's adapter
on a real (tiny) diffusers model, the trainer's velocity call and LoRA targets, the memory planner, the Train
node's defaults, and ComfyUI's description of the same family (its file signature and LoRA targets)."""

from __future__ import annotations

import re

import pytest
import torch

from distill_core import memory as M
from families import BUILDERS
from pack import node_module
from xslim_core.adapters import adapter_for
from xslim_core.families import REGISTRY, family_of_class, family_spec, trainable_families

SPECS = list(REGISTRY.values())


@pytest.fixture(scope="module", params=[s.id for s in SPECS])
def family(request):
    spec = family_spec(request.param)
    return spec, BUILDERS[spec.id]()


def test_every_family_has_a_test_builder_and_a_unique_class():
    assert {s.id for s in SPECS} <= set(BUILDERS), "a registered family without a tiny model in tests/families.py"
    classes = [c for s in SPECS for c in s.model_classes]
    assert len(classes) == len(set(classes)) and all(family_of_class(c).id == s.id for s in SPECS for c in s.model_classes)


def test_the_adapter_describes_the_real_model(family):
    spec, built = family
    adapter = adapter_for(built.model)
    assert type(adapter) is spec.adapter and adapter.family == spec.id
    blocks = adapter.blocks(built.model)
    assert blocks and sum(n for _, n in adapter.stack_sizes(built.model)) == len(blocks)
    assert all(stack in spec.adapter.block_outputs and stack in spec.adapter.attention for stack, _ in spec.adapter.stacks)


def test_a_trainable_family_is_complete_for_the_trainer_and_the_planner(family):
    spec, built = family
    if not spec.trainable:
        assert spec.latent is None and spec.trainer is None, "training facts on a family the trainer has no call for"
        return
    assert spec.latent is not None and spec.trainer is not None and spec.reference_model in M.MODELS
    assert M.MODELS[spec.reference_model].family in (spec.id, *spec.aliases)
    planner = M.FAMILIES[spec.id]
    assert (planner.latent_downscale, planner.patch, planner.temporal_downscale, planner.text_tokens) == (
        spec.latent.downscale, spec.latent.patch, spec.latent.temporal_downscale, spec.text_tokens)
    assert all(M.FAMILIES[alias].latent_downscale == planner.latent_downscale for alias in spec.aliases)
    assert M.CLASS_FAMILIES[spec.model_classes[0]] == spec.id
    assert spec.trainer.batch_size >= 1 and spec.trainer.guidance_scale >= 1
    adapted = [n for n, m in built.model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(spec.lora_targets, n)]
    blocks = {id(b.module) for b in adapter_for(built.model).blocks(built.model)}
    in_blocks = {n.split(".")[0] + "." + n.split(".")[1] for n in adapted}
    assert adapted and len(in_blocks) == len(blocks), "LoRA targets must reach a linear layer in every block"


def test_comfyuis_side_of_each_trainable_family_matches_its_record():
    nodes = node_module("families")
    by_id = {f.family: f for f in nodes.FAMILIES}
    for spec in trainable_families():
        comfy = by_id[spec.id]
        assert comfy.short_name and comfy.lora_targets and re.compile(comfy.lora_targets)
    for family in nodes.FAMILIES:  # a file's tensor names name exactly one family
        names = {f"{key}0.weight" for key in family.file_keys}
        assert nodes.family_of_file(names) is family, family.family
        assert [f for f in nodes.FAMILIES if f.recognises(names)] == [family]
    assert nodes.family_of_file({"model.diffusion_model.input_blocks.0.0.weight"}) is None
