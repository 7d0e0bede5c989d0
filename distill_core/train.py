"""Command line: train one stage of 1.x-Distill; run it again to resume. Works under torchrun (NCCL on GPUs,
gloo on CPU; DDP averages each role's gradients).

    python -m distill_core.train --config run.json [--run-dir DIR] [--iterations N]
    torchrun --nproc_per_node 2 -m distill_core.train --config run.json
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .config import RunConfig
from .jobfiles import ResumeRefused, RunFolderBusy
from .logs import show_on_stdout
from .parallel import init_distributed, shutdown
from .runtime import MemoryPlanRefused, run_training

# refusals before the first iteration: the user's to fix, so a message rather than a traceback
REFUSALS = (MemoryPlanRefused, ResumeRefused, RunFolderBusy)
WRITE_FAILURES = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)  # a full disk, a read-only folder


def is_main_rank() -> bool:
    """Rank 0 under torchrun (its RANK variable; the process group is gone by the final line), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one stage of 1.x-Distill (resumes from --run-dir).")
    parser.add_argument(
        "--config",
        required=True,
        help="run config JSON: the RunConfig fields (distill_core/config.py; docs/DISTILL.md, 'Training runtime', has an example)",
    )
    parser.add_argument("--run-dir", help="override the config's run_dir")
    parser.add_argument("--iterations", type=int, help="override the iteration budget")
    parser.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this long")
    args = parser.parse_args(argv)
    show_on_stdout()
    try:
        cfg = RunConfig.load(
            args.config, run_dir=args.run_dir, iterations=args.iterations, max_minutes=args.max_minutes
        )
    except (OSError, ValueError) as err:  # a bad file or value: argparse's "error:" line and exit status 2
        parser.error(str(err))
    init_distributed(cfg.device)  # a no-op outside torchrun
    ended_together = False
    try:
        result = run_training(cfg)
        ended_together = True  # run_training returned on every rank (its collectives keep them in step)
    except REFUSALS as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_FAILURES:
            raise
        # checkpoints are written atomically: the last complete one is still there, so say so instead of a traceback
        print(
            f"{parser.prog}: error: cannot write {err.filename or cfg.run_dir}: {err.strerror}. The last checkpoint in "
            f"{cfg.run_dir} is kept; free disk space or make the folder writable, then run the same command again to "
            "resume from it.",
            file=sys.stderr,
        )
        return 1
    finally:
        shutdown(synchronize=ended_together)
    if is_main_rank():  # under torchrun every rank returns the same result: one final line, from rank 0
        print(
            f"[1.x-Distill] {cfg.stage}: {result['status']} at iteration {result['iteration']}"
            + (f"; student {result['student']}" if result["student"] else "")
        )
    return 0 if result["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
