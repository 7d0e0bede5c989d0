"""1.x-Distill: DMD-style distillation to a 1.x-NFE student with block-cache compensation.

Pure PyTorch (never imports ComfyUI). The method is specified in the project's reference notes; its
implementation is tracked as its own issue and lands here.
"""
