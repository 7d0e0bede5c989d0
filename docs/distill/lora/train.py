import sys
import time
import os
sys.path.insert(0, "/work/main")
from distill_core.config import RunConfig
from distill_core.runtime import run_training
from xslim_lab.distill_demo import STAGE1, STAGE1_ITERATIONS, BATCH
out = "/work/runs/lora_cmp"
runs = [("full", 0, STAGE1), ("lora64", 64, {"lr_student": 4e-4, "lr_fake": 3.2e-3}), ("lora16", 16, {"lr_student": 4e-4, "lr_fake": 3.2e-3})]
for name, rank, lrs in runs:
    cfg = RunConfig(run_dir=os.path.join(out, name), stage="stage1", iterations=STAGE1_ITERATIONS, batch_size=BATCH, threads=1,
                    lora_rank=rank, checkpoint_every=50, preview_every=100, stage1={**lrs, "steps": 2})
    t = time.time()
    r = run_training(cfg)
    print(name, r["status"], round((time.time() - t) / 60, 1), "min", flush=True)
