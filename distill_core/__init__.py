"""1.x-Distill: DMD-style distillation to a 1.x-NFE student with block-cache compensation.

Pure PyTorch (never imports ComfyUI). ``SHIPPED_STUDENTS`` is the folder of the demo students shipped with the
pack (written by ``python -m xslim_lab.distill_demo --ship``).
"""

import os

SHIPPED_STUDENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
