"""The contracts between the engine and what it drives: blocks, model calls, controllers, and the host seam.

Each host brings its own classes (the diffusers adapters' ``BlockSpec``/``BoundBlock`` and ``ModelCall``,
ComfyUI's ``DictBlockSpec``/``ComfyModelCall`` in ``nodes/``, the student's block specs in
``nodes/distill_host.py``); these protocols say what the engine and the student's cached step may call on
them, so nothing is probed with ``hasattr``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from .config import StepPlan
from .state import RowState


class BlockCall(Protocol):
    """One call of a block, seen as its image and text streams (what the student's cached step needs)."""

    @property
    def img(self) -> torch.Tensor: ...

    @property
    def txt(self) -> torch.Tensor | None: ...

    def call(self, forward: Callable) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block through ``forward`` (its forward as it stands, other parties' hooks included) and
        return its (image, text) outputs."""

    def pack(self, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        """(image, text) outputs in the block's own output form."""


class EngineBlockCall(BlockCall, Protocol):
    """A block call as the X-Slim engine carries out its plans on it: token subsets and joined streams too."""

    # the block adds to its inputs in place (ComfyUI's ``x += ...``): the engine copies what it must keep
    @property
    def mutates_inputs(self) -> bool: ...

    @property
    def img(self) -> torch.Tensor: ...

    @img.setter
    def img(self, value: torch.Tensor) -> None: ...

    def image_tokens(self, img: torch.Tensor, n_img: int) -> torch.Tensor:
        """The image tokens of an image-stream output."""

    def with_image_tokens(self, img: torch.Tensor, tokens: torch.Tensor, n_img: int) -> torch.Tensor:
        """The image-stream output with its ``n_img`` image tokens replaced by ``tokens``."""

    def streams(
        self, img: torch.Tensor, txt: torch.Tensor | None, n_img: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens, text tokens) of the block's inputs or outputs."""

    def join_streams(
        self, image: torch.Tensor, text: torch.Tensor | None, n_img: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse of ``streams``: (img, txt) in the block's own stream form."""


class PatchableBlock(Protocol):
    """A block the student's cached step patches by its module (``distill_core.cache``)."""

    @property
    def index(self) -> int: ...

    @property
    def stack(self) -> str: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def outputs(self) -> tuple[str, ...]:
        """Order of the block's outputs, e.g. ("txt", "img")."""

    def bind(self, args: tuple, kwargs: dict) -> BlockCall: ...


class EngineBlock(Protocol):
    """A block as the engine sees it; a host turns each call of it into ``XSlimEngine.block_call``."""

    @property
    def index(self) -> int:
        """Position in the whole block sequence (all stacks)."""

    @property
    def attention(self) -> Sequence:
        """One entry per attention call the block makes, in order (what an entry is: the host's business)."""

    def bind(self, args: tuple, kwargs: dict) -> EngineBlockCall: ...

    def passthrough(self, args: tuple, kwargs: dict) -> Any | None:
        """The block's output when it returns its inputs unchanged (inside a skipped step), found without
        binding; None when that needs ``bind``."""


class EngineModelCall(Protocol):
    """One call of the whole model as ``XSlimEngine.dispatch`` sees it."""

    @property
    def batch(self) -> int: ...

    @property
    def sigma(self) -> float: ...

    @property
    def time_resolution(self) -> float:
        """Relative precision the timestep arrived in (0 for Python numbers)."""

    @property
    def shape_key(self) -> tuple:
        """What a run keeps: batch and resolution."""

    @property
    def keys(self) -> list:
        """Cache-state key of each batch row."""

    def args_for(self, rows: list[int]) -> tuple[tuple, dict]:
        """The call's arguments restricted to batch ``rows``."""

    def merge(self, outputs: list, groups: list[list[int]]) -> Any:
        """The outputs of row groups put back into batch order."""


class Controller(Protocol):
    """Turns (row state, step) into a plan; pure decisions (``controller.py``)."""

    @property
    def plans_token_refreshes(self) -> bool:
        """A token refresh may come: the engine keeps each row's last output for it."""

    def plan(self, row: RowState, step: int) -> StepPlan: ...


class AttentionSeam(Protocol):
    """What a host may do with the model call being carried out (``XSlimEngine.current_call``): route the
    attention calls of the running block to the engine. Two ways in: a host that calls the kernel itself
    announces a block's attention calls and hands each over (``expect_attention``, ``attend_next``); a host
    whose kernel the engine intercepts marks where each attention module starts and ends (``enter_attention``,
    ``leave_attention``)."""

    def expect_attention(self, block: EngineBlock) -> None: ...

    @property
    def expects_attention(self) -> bool: ...

    def attend_next(
        self, sdpa: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None
    ) -> torch.Tensor: ...

    def enter_attention(self, layer: tuple) -> None: ...

    def leave_attention(self) -> None: ...
