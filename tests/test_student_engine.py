"""The engine's segment mode is the 1.x student's cached step: one block-cache mechanism for both halves.

On the shipped 1.75-NFE student (diffusers) the engine, driving the student's own blocks through its hooks,
gives the latents of distill_core's sampler and counts exactly the blocks the file declares.
"""

import pytest
import torch

from distill_core.student import load_student, run_student
from xslim_core import XSlim, XSlimConfig
from xslim_core.config import StepKind

SHIPPED = "distill_core/weights/student_1x_175.safetensors"


def _compensation(student):
    comp = student.compensation
    return lambda img, txt: (comp.img(img), None if txt is None else comp.txt(txt))


@pytest.fixture(scope="module")
def student():
    return load_student(SHIPPED)


def _sample_with_engine(student, noise, labels, transform):
    config = XSlimConfig(mode="segment", segment=(student.cache.first, student.cache.last))
    with XSlim(student.net.module, config, segment_transform=transform) as cache:
        with cache.run(student.sigmas), torch.no_grad():
            out = run_student(student.net, noise, student.conditioning(labels), student.sigmas)  # plain steps: the engine caches
        return out, cache.stats


def test_segment_mode_equals_the_students_own_cached_sampler(student):
    g = torch.Generator().manual_seed(3)
    noise, labels = torch.randn(4, 16, 1, 8, 8, generator=g), torch.tensor([0, 3, 7, 9])
    expected = student.sample(noise, labels)
    got, stats = _sample_with_engine(student, noise, labels, _compensation(student))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert stats.effective_nfe == pytest.approx(student.effective_nfe) == pytest.approx(1.75)
    assert {stats.pattern(r) for r in stats.decisions} == {StepKind.FULL.value + StepKind.BLOCK.value}
    plain, _ = _sample_with_engine(student, noise, labels, None)  # the compensation is doing something
    assert (plain - expected).abs().max() > 1e-3


def test_segment_outside_the_model_or_malformed_is_refused(student):
    with pytest.raises(ValueError, match="outside this model's 12 blocks"):
        XSlim(student.net.module, XSlimConfig(mode="segment", segment=(10, 12)))
    with pytest.raises(ValueError, match="segment=\\(first, last\\)"):
        XSlimConfig(mode="segment", segment=(5, 4))
    with pytest.raises(ValueError, match="only works in segment mode"):
        XSlimConfig(mode="online", segment=(1, 2))
