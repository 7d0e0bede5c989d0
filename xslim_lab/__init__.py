"""Measuring tools only, kept out of the engine packages (``xslim_core``, ``distill_core``) and the demo model
(``xslim_demo``, which the nodes use at runtime).

- ``metrics``, ``timing``: the one metrics module both halves' evaluations use, alternating timers and block
  counters;
- ``bench``, ``bench_compute``, ``demo``: X-Slim's benchmarks and demo; ``demo_evaluate``: the demo teacher's
  evaluation; ``distill_evaluate``, ``distill_demo``, ``distill_sample``, ``memory_bench``, ``tiny``: 1.x-Distill's
  evaluation, demo recipe, sampling, memory measurements and test teacher; ``package_check``: `make package-check`.
"""
