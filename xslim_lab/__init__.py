"""Measuring tools and the demo model, kept out of the two engine packages (``xslim_core``, ``distill_core``).

- ``demo_model``: the demo teacher (a tiny HunyuanVideo-architecture DiT trained here on Fashion-MNIST), its
  classifier, data, latent transform and weights;
- ``metrics``, ``timing``, ``sampling``: the one metrics module both halves' evaluations use, alternating
  timers and block counters, reference samplers;
- ``bench``, ``bench_compute``, ``demo``: X-Slim's benchmarks and demo; ``distill_evaluate``, ``distill_demo``,
  ``distill_sample``, ``memory_bench``, ``tiny``: 1.x-Distill's evaluation, demo recipe, sampling, memory
  measurements and test teacher.
"""
