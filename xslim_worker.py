"""The training worker's entry point: ``python xslim_worker.py --run-dir RUN`` (the Train node launches it, alone or
under torchrun). Installed, the same is ``python -m distill_core.worker``."""

import os
import sys

# Python puts a script's folder first on sys.path, except Windows' embedded distribution (ComfyUI portable): its
# ._pth file fixes the path and PYTHONPATH is ignored. There this folder is added here, at the one entry point.
_PACK = os.path.dirname(os.path.abspath(__file__))
if _PACK not in sys.path:
    sys.path.insert(0, _PACK)

from distill_core.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
