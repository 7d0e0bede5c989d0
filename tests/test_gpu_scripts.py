"""The prepared GPU scripts must not rot where no GPU is lent: each runs its --tiny CPU mode end to end and
prints its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_trainer_benchmark_runs_the_real_trainer_in_its_tiny_mode(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "scripts/gpu_trainer_bench.py", "--tiny", "--rank", "4", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["status"] == "done" and figures["iterations"] == 3 and figures["it_per_s"] > 0
    assert figures["lora_rank"] == 4 and figures["params"] > 0
