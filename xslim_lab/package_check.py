"""`make package-check`: run from a fresh environment where the pack was installed with ``pip install .``.

Checks that every package imports from the installed copy (not from a checkout on the path), that the package data
(the demo teacher, its classifier, the demo students) came along, and that a cached sampling run and a student load
work from there. One line on success; an exception naming what is missing otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import sysconfig

import torch

PACKAGES = ("xslim_core", "distill_core", "xslim_demo", "xslim_lab")
log = logging.getLogger("xslim")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    for name in PACKAGES:
        where = os.path.realpath(importlib.import_module(name).__file__)
        if not where.startswith(site + os.sep):
            raise RuntimeError(f"{name} imported from {where}, not from the installed copy under {site}")

    from distill_core.student import load_student
    from xslim_core import XSlim, XSlimConfig
    from xslim_demo import load_teacher
    from xslim_demo.classifier import load_classifier
    from xslim_demo.grid import class_noise
    from xslim_demo.sampling import flow_sigmas, sample_euler

    teacher = load_teacher()
    load_classifier()
    sigmas = flow_sigmas(8)
    noise, labels = class_noise(1, seed=0)
    with XSlim(teacher.model, XSlimConfig(mode="online"), sigmas=sigmas) as cache:
        sample_euler(teacher.velocity_fn(labels), noise, sigmas, cfg_scale=2.0)
        cache.end_run()
    weights = os.path.join(os.path.dirname(importlib.import_module("distill_core").__file__), "weights")
    students = sorted(f for f in os.listdir(weights) if f.endswith(".safetensors"))
    for name in students:
        load_student(os.path.join(weights, name)).sample(noise[:2], labels[:2])
    log.info("pip install . works: %s imported from %s; demo teacher sampled (%s); %d students sampled",
             ", ".join(PACKAGES), site, cache.stats.summary(), len(students))
    return 0 if torch.isfinite(noise).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
