"""The shipped workflow files are what their generators write, and each has its Templates-browser card.

A hand edit of a JSON file, or a generator change without regenerating, fails here (the files are regenerated
with ``python workflows/build_workflows.py`` and ``python workflows/build_train_workflows.py``). The frontend asks
for ``<name>.jpg`` next to every template; a missing one is a broken card in the Templates browser."""

from __future__ import annotations

import json
import os

import pytest

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
SHIPPED = sorted(n for n in os.listdir(WORKFLOWS) if n.endswith(".json"))


def generators() -> dict:
    import build_train_workflows
    import build_workflows

    return {**build_workflows.WORKFLOWS, **build_train_workflows.WORKFLOWS}


def test_every_shipped_workflow_has_a_generator_and_a_card():
    built = generators()
    assert sorted(built) == SHIPPED, "a workflow file without a generator, or a generator whose file is missing"
    missing = [n for n in SHIPPED if not os.path.isfile(os.path.join(WORKFLOWS, n[:-5] + ".jpg"))]
    assert not missing, f"no thumbnail for {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_file_is_what_its_generator_writes(name):
    build = generators()[name]
    with open(os.path.join(WORKFLOWS, name)) as f:
        shipped = json.load(f)
    assert json.loads(json.dumps(build().to_json())) == shipped, f"{name} differs from its generator: regenerate it"


def test_an_unmeasured_node_type_is_refused_not_guessed():
    from workflow_graph import MEASURED_SIZES, UnmeasuredNodeType, node_size
    assert node_size("KSampler") == list(MEASURED_SIZES["KSampler"])
    with pytest.raises(UnmeasuredNodeType, match="NoSuchNode has no measured size .* XSLIM_WRITE_NODE_SIZES=1"):
        node_size("NoSuchNode")
