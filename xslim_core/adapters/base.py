"""The adapter protocol: how the engine sees a DiT.

A model is an input embedding, one or two block stacks and a final layer. The engine only needs, per block,
where the image and text streams are in its arguments and outputs, and which attention modules it owns
(with the token layout of their joint sequence); per model call, the sigma and how to slice the batch.
Adapters bind arguments by the block's own signature, so no model code is copied.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..protocols import EngineBlockCall

# The block call an adapter's blocks make (``BoundBlock`` for diffusers): what its gather_positions receives.
BlockCallT = TypeVar("BlockCallT", bound="EngineBlockCall")


@dataclass
class BlockSpec:
    index: int  # position in the whole block sequence (all stacks)
    stack: str
    module: nn.Module
    img_arg: str
    txt_arg: str | None
    outputs: tuple[str, ...]  # order of the block's outputs, e.g. ("txt", "img")
    attention: list[tuple[nn.Module, str]]  # (attention module, token layout)
    signature: inspect.Signature = field(init=False)

    def __post_init__(self):
        self.signature = class_signature(self.module)
        names = list(self.signature.parameters)
        self._positions = {name: names.index(name) for name in (self.img_arg, self.txt_arg) if name in names}

    def bind(self, args, kwargs) -> "BoundBlock":
        return BoundBlock(self, args, kwargs)

    def _argument(self, name: str | None, args, kwargs):
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        pos = self._positions.get(name)
        return args[pos] if pos is not None and pos < len(args) else None

    def passthrough(self, args, kwargs):
        """The block's output when it returns its inputs unchanged (a block inside a skipped step), without binding
        every argument by signature; None when the streams cannot be found this way."""
        img, txt = self._argument(self.img_arg, args, kwargs), self._argument(self.txt_arg, args, kwargs)
        if img is None or (len(self.outputs) > 1 and self.txt_arg is not None and txt is None):
            return None
        if len(self.outputs) == 1:
            return img
        return tuple(img if name == "img" else txt for name in self.outputs)


def class_signature(module: nn.Module) -> inspect.Signature:
    """The signature of the module class's own forward: another party's instance wrapper (``*args, **kwargs``)
    must not hide the argument names the engine binds by."""
    return inspect.signature(functools.partial(type(module).forward, module))


class BoundBlock:
    """One call of a block, with its arguments addressable by name."""

    mutates_inputs = False  # diffusers blocks return new tensors

    def __init__(self, spec: BlockSpec, args, kwargs):
        self.spec = spec
        self.bound = spec.signature.bind(*args, **kwargs)
        self.arguments = self.bound.arguments

    @property
    def img(self) -> torch.Tensor:
        return self.arguments[self.spec.img_arg]

    @img.setter
    def img(self, value: torch.Tensor) -> None:
        self.arguments[self.spec.img_arg] = value

    @property
    def txt(self) -> torch.Tensor | None:
        return self.arguments.get(self.spec.txt_arg) if self.spec.txt_arg else None

    def call(self, forward) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = forward(*self.bound.args, **self.bound.kwargs)
        if len(self.spec.outputs) == 1:
            return out, None
        named = dict(zip(self.spec.outputs, out))
        return named["img"], named.get("txt")

    def image_tokens(self, img: torch.Tensor, n_img: int) -> torch.Tensor:
        """The image tokens of this block's image-stream output (diffusers keeps the streams apart)."""
        return img

    def with_image_tokens(self, img: torch.Tensor, tokens: torch.Tensor, n_img: int) -> torch.Tensor:
        """The image-stream output with its ``n_img`` image tokens replaced by ``tokens``."""
        return tokens

    def streams(
        self, img: torch.Tensor, txt: torch.Tensor | None, n_img: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens, text tokens) of a block's inputs or outputs: diffusers keeps them apart already."""
        return img, txt

    def join_streams(
        self, image: torch.Tensor, text: torch.Tensor | None, n_img: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return image, text

    def pack(self, img: torch.Tensor, txt: torch.Tensor | None):
        if len(self.spec.outputs) == 1:
            return img
        return tuple(img if name == "img" else txt for name in self.spec.outputs)


class ModelCall:
    """One call of the whole model: its sigma, batch size, and the batch sliced by rows."""

    def __init__(self, adapter: "Adapter", forward, args, kwargs, signature: inspect.Signature | None = None):
        self.adapter = adapter
        signature = signature or inspect.signature(forward)  # the engine passes the class's own forward
        bound = signature.bind(*args, **kwargs)
        self.arguments = bound.arguments
        self._bound = bound
        self.img = self.arguments[adapter.img_arg]
        self.batch = self.img.shape[0]

    @property
    def sigma(self) -> float:
        t = self.arguments[self.adapter.time_arg]
        t = t.reshape(-1)[0].item() if torch.is_tensor(t) else float(t)
        return t / self.adapter.time_scale

    @property
    def time_resolution(self) -> float:
        """Relative precision of the timestep input (its dtype's epsilon), 0 for Python numbers."""
        t = self.arguments[self.adapter.time_arg]
        return torch.finfo(t.dtype).eps if torch.is_tensor(t) and t.is_floating_point() else 0.0

    @property
    def keys(self) -> list:
        """Cache-state key of each batch row (its index: one row = one sample of one CFG branch)."""
        return list(range(self.batch))

    @property
    def shape_key(self) -> tuple:
        txt = self.arguments.get(self.adapter.txt_arg) if self.adapter.txt_arg else None
        return (tuple(self.img.shape), self.img.dtype, None if txt is None else tuple(txt.shape))

    def args_for(self, rows: list[int]) -> tuple[tuple, dict]:
        if rows == list(range(self.batch)):
            return self._bound.args, self._bound.kwargs
        index = torch.tensor(rows)
        sliced = inspect.BoundArguments(self._bound.signature, dict(self.arguments))
        for name, value in self.arguments.items():
            if name not in self.adapter.unbatched_inputs:
                sliced.arguments[name] = take_rows(value, index, self.batch)
        return sliced.args, sliced.kwargs

    @staticmethod
    def merge(outputs: list, groups: list[list[int]]):
        """Put the outputs of row groups back into the original batch order, in the model's output type."""
        merged = merge_rows([o.sample if hasattr(o, "sample") else o[0] for o in outputs], groups)
        first = outputs[0]
        return type(first)(sample=merged) if hasattr(first, "sample") else (merged,)


def take_rows(value, index: torch.Tensor, batch: int):
    """``value``'s rows ``index`` when it is a tensor with the batch as its first dimension, else ``value``."""
    if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch:
        return value.index_select(0, index.to(value.device))
    return value


def merge_rows(outputs: list[torch.Tensor], groups: list[list[int]]) -> torch.Tensor:
    """The outputs of row groups, concatenated and put back into the original batch order."""
    order = [r for g in groups for r in g]
    inverse = torch.tensor(sorted(range(len(order)), key=order.__getitem__))
    merged = torch.cat(outputs, dim=0)
    return merged.index_select(0, inverse.to(merged.device))


class Adapter(Generic[BlockCallT]):
    """Base for one model family. Subclasses set the class attributes and, for RoPE models, gather_positions."""

    family: str = ""
    display_name: str = ""
    model_classes: tuple[str, ...] = ()
    stacks: tuple[tuple[str, str], ...] = ()  # (stack name, attribute holding the ModuleList)
    img_arg = "hidden_states"
    txt_arg: str | None = "encoder_hidden_states"
    block_img_arg = "hidden_states"
    block_txt_arg: str | None = "encoder_hidden_states"
    block_outputs: dict[str, tuple[str, ...]] = {}
    attention: dict[str, tuple[tuple[str, str], ...]] = {}  # stack -> ((attribute, layout), ...)
    time_arg = "timestep"
    time_scale = 1000.0  # timestep = sigma * time_scale
    unbatched_inputs: tuple[str, ...] = ()
    per_row_positions = False  # RoPE tables have no batch dim: a token subset must share its rows' positions
    # Submodules of the model whose outputs only the block stack reads (text refiners, RoPE tables): a skipped
    # step passes the stack through, so it need not compute them. Listed only where the model's forward was
    # checked to read nothing of them after the blocks.
    block_only_inputs: tuple[str, ...] = ()

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        specs: list[BlockSpec] = []
        for stack, attr in self.stacks:
            for block in getattr(model, attr):
                attention = [
                    (getattr(block, name), layout)
                    for name, layout in self.attention[stack]
                    if getattr(block, name, None) is not None
                ]
                specs.append(
                    BlockSpec(
                        len(specs),
                        stack,
                        block,
                        self.block_img_arg,
                        self.block_txt_arg,
                        self.block_outputs[stack],
                        attention,
                    )
                )
        return specs

    def stack_sizes(self, model: nn.Module) -> list[tuple[str, int]]:
        return [(stack, len(getattr(model, attr))) for stack, attr in self.stacks]

    def gather_positions(self, block: BlockCallT, idx: torch.Tensor, n_img: int, memo: dict) -> None:
        """Restrict positional inputs (RoPE tables, masks) of a block call to the token subset ``idx``.
        ``memo`` lives for one model call: blocks share their RoPE table, so it is gathered once."""

    def unsupported(self, call: ModelCall) -> str | None:
        """A reason this call cannot be cached (it then runs uncached), or None."""
        return None
