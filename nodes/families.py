"""ComfyUI's native DiTs as the engine sees them: one small table per family.

ComfyUI runs every block of these models through ``patches_replace["dit"]`` with a dict of arguments
(``img``, ``txt``, ...) and an ``original_block`` callable, so one block protocol serves all of them. The
families differ only in their block lists and in where image tokens sit in the single stream. Stack names
match the diffusers adapters, so a profile recorded in diffusers fits the same model loaded in ComfyUI.
Nothing here imports ComfyUI: models are recognised by class name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xslim_core.adapters import Adapter
from xslim_core.tokens import IMG_FIRST, IMG_ONLY, TXT_FIRST, join_sequence, split_sequence


@dataclass
class DictBlockSpec:
    """One block as ComfyUI patches it: ``patch`` is its key in ``patches_replace["dit"]``."""

    index: int
    stack: str
    patch: tuple[str, int]
    layout: str  # where the image tokens are in the block's "img" stream
    attention: tuple = field(default=())  # token layout of each attention call the block makes, in order

    def bind(self, args, kwargs) -> "DictBlock":
        return DictBlock(self, args[0])

    def passthrough(self, args, kwargs) -> None:
        return None  # the streams are in the argument dict: the engine binds it (cheaply) to pass them through


class DictBlock:
    """One call of a patched block: its argument dict, addressable like the engine's BoundBlock."""

    mutates_inputs = True  # ComfyUI blocks add residuals in place (``x += ...``)

    def __init__(self, spec: DictBlockSpec, arguments: dict):
        self.spec = spec
        self.arguments = dict(arguments)

    @property
    def img(self) -> torch.Tensor:
        return self.arguments["img"]

    @img.setter
    def img(self, value: torch.Tensor) -> None:
        self.arguments["img"] = value

    @property
    def txt(self) -> torch.Tensor | None:
        return self.arguments.get("txt")

    def call(self, forward) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = forward(self.arguments)
        return out["img"], out.get("txt")

    def image_tokens(self, img: torch.Tensor, n_img: int) -> torch.Tensor:
        return split_sequence(img, self.spec.layout, img.shape[1] - n_img, dim=1)[1]

    def with_image_tokens(self, img: torch.Tensor, tokens: torch.Tensor, n_img: int) -> torch.Tensor:
        txt, _ = split_sequence(img, self.spec.layout, img.shape[1] - n_img, dim=1)
        return join_sequence(txt, tokens, self.spec.layout, dim=1)

    def streams(self, img: torch.Tensor, txt: torch.Tensor | None, n_img: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image tokens, text tokens): a single-stream block carries both in ``img``, in its layout."""
        if txt is not None or self.spec.layout == IMG_ONLY:
            return img, txt
        text, image = split_sequence(img, self.spec.layout, img.shape[1] - n_img, dim=1)
        return image, text

    def join_streams(self, image: torch.Tensor, text: torch.Tensor | None, n_img: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "txt" in self.arguments or self.spec.layout == IMG_ONLY or text is None:
            return image, text
        return join_sequence(text, image, self.spec.layout, dim=1), None

    def pack(self, img: torch.Tensor, txt: torch.Tensor | None) -> dict:
        return {"img": img, "txt": txt} if "txt" in self.arguments else {"img": img}


class ComfyFamily(Adapter):
    """A ComfyUI model family: (stack, attribute of the diffusion model, patch kind) per block stack."""

    comfy_stacks: tuple[tuple[str, str, str], ...] = ()
    short_name = ""  # how the Train node names the family to a user
    # a model file's tensor names (ComfyUI's, without ``diffusion_model.``) contain all of these, and none of those
    file_keys: tuple[str, ...] = ()
    file_keys_absent: tuple[str, ...] = ()
    lora_targets = ""  # the linears 1.x-Distill adapts with LoRA, under ComfyUI's parameter names
    token_level = True
    single_layout = IMG_ONLY  # image tokens in the single stream
    attention_layout = IMG_ONLY  # image tokens in the joint attention sequence
    positional_blocks = False  # 1.x-Distill: the blocks take (context, x, c) by position, not named img/txt streams
    text_mask_input = False  # 1.x-Distill: the model takes the text padding mask as ``attention_mask``

    def layouts(self, diffusion_model) -> tuple[str, str]:
        """(where the image tokens sit in the single stream, and in the joint attention sequence) of this model."""
        return self.single_layout, self.attention_layout

    @classmethod
    def recognises(cls, names: set[str]) -> bool:
        """Whether a model file with these tensor names is of this family."""
        def has(part):
            return any(part in name for name in names)

        return bool(cls.file_keys) and all(map(has, cls.file_keys)) and not any(map(has, cls.file_keys_absent))

    def specs(self, diffusion_model) -> list[DictBlockSpec]:
        specs = []
        single, attention = self.layouts(diffusion_model)
        for stack, attr, kind in self.comfy_stacks:
            layout = IMG_ONLY if kind == "double_block" else single
            for i, block in enumerate(getattr(diffusion_model, attr)):
                specs.append(DictBlockSpec(len(specs), stack, (kind, i), layout, self.block_attention(block, attention)))
        return specs

    def block_attention(self, block, layout: str) -> tuple[str, ...]:
        """Token layout of each attention call of ``block``; none where the token level is off."""
        return (layout,) if self.token_level else ()

    def text_dims(self, diffusion_model) -> tuple[int | None, int | None]:
        """(text token width, pooled vector width) the model takes (1.x-Distill checks a prompt set against them)."""
        params = diffusion_model.params
        return params.context_in_dim, params.vec_in_dim

    def stack_sizes(self, diffusion_model) -> list[tuple[str, int]]:
        return [(stack, len(getattr(diffusion_model, attr))) for stack, attr, _ in self.comfy_stacks]

    def gather_positions(self, block: DictBlock, idx: torch.Tensor, n_img: int, memo: dict) -> None:
        """RoPE families: keep the text rows and each sample's own image rows of the table ``pe``
        ([B, 1, N, D/2, 2, 2]); ComfyUI's table has a batch dimension, so rows need no separate calls."""
        pe = block.arguments.get("pe")
        if pe is None:
            return
        if id(pe) not in memo:
            n_txt = pe.shape[2] - n_img
            txt = torch.arange(n_txt, device=idx.device).expand(idx.shape[0], -1)
            rows = torch.cat([txt, idx + n_txt], 1) if block.spec.attention[0] == TXT_FIRST else torch.cat([idx, txt + n_img], 1)
            table = pe.expand(idx.shape[0], *pe.shape[1:]) if pe.shape[0] != idx.shape[0] else pe
            index = rows.to(pe.device).view(rows.shape[0], 1, -1, *([1] * (pe.ndim - 3))).expand(-1, pe.shape[1], -1, *pe.shape[3:])
            memo[id(pe)] = (pe, table.gather(2, index))  # pe kept alive: its id stays unique
        block.arguments["pe"] = memo[id(pe)][1]


# LoRA on the attention and MLP projections of every block, under ComfyUI's names
DOUBLE_SINGLE_LORA_TARGETS = (r".*(double_blocks\.\d+\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.(0|2)|txt_mlp\.(0|2))|"
                              r"single_blocks\.\d+\.(linear1|linear2))")


class ComfyFlux(ComfyFamily):
    family, display_name, short_name = "flux", "FLUX (dev, schnell, Kontext)", "FLUX"
    model_classes = ("Flux",)
    file_keys, file_keys_absent = ("double_blocks.", "single_blocks."), ("txt_in.individual_token_refiner",)
    lora_targets = DOUBLE_SINGLE_LORA_TARGETS
    comfy_stacks = (("double", "double_blocks", "double_block"), ("single", "single_blocks", "single_block"))
    single_layout = attention_layout = TXT_FIRST  # sequences are cat(txt, img)


class ComfyHunyuanVideo(ComfyFamily):
    family, display_name, short_name = "hunyuan_video", "HunyuanVideo", "HunyuanVideo"
    model_classes = ("HunyuanVideo",)
    file_keys = ("double_blocks.", "txt_in.individual_token_refiner")
    lora_targets = DOUBLE_SINGLE_LORA_TARGETS
    comfy_stacks = (("double", "double_blocks", "double_block"), ("single", "single_blocks", "single_block"))
    text_mask_input = True

    def layouts(self, diffusion_model) -> tuple[str, str]:
        # ComfyUI 0.3.x builds HunyuanVideo's double blocks with ``flipped_img_txt=True`` and orders every sequence
        # cat(img, txt); ComfyUI 0.28 dropped the flag and orders them cat(txt, img), as FLUX. Read off the block
        # itself: a fixed order silently mixed text rows into the refreshed image tokens on the newer host.
        blocks = getattr(diffusion_model, "double_blocks", ())
        layout = IMG_FIRST if len(blocks) and getattr(blocks[0], "flipped_img_txt", False) else TXT_FIRST
        return layout, layout


class ComfySD3(ComfyFamily):
    family, display_name, short_name = "sd3", "SD3 / SD3.5 (MMDiT)", "SD3/SD3.5"
    model_classes = ("MMDiT",)
    file_keys = ("joint_blocks.",)
    lora_targets = r".*(joint_blocks\.\d+\.(context_block|x_block)\.(attn2?\.(qkv|proj)|mlp\.(fc1|fc2)))"
    comfy_stacks = (("joint", "joint_blocks", "double_block"),)
    attention_layout = TXT_FIRST  # joint attention over cat(context, x)
    positional_blocks = True

    def text_dims(self, diffusion_model) -> tuple[int | None, int | None]:
        embedder = diffusion_model.context_embedder
        return getattr(embedder, "in_features", None), getattr(diffusion_model.y_embedder.mlp[0], "in_features", None)

    def block_attention(self, block, layout: str) -> tuple[str, ...]:
        extra = getattr(block.x_block, "x_block_self_attn", False)  # SD3.5: a second, image-only attention
        return (TXT_FIRST, IMG_ONLY) if extra else (TXT_FIRST,)


class ComfyWan(ComfyFamily):
    """Wan 2.1/2.2: one stack of image-only blocks (text enters by cross-attention); ComfyUI patches them as
    ``double_block``. No token level: Wan 2.2's per-token timestep modulation cannot follow a token subset."""

    family, display_name, short_name = "wan", "Wan 2.1 / 2.2", "Wan"
    model_classes = ("WanModel",)
    file_keys = ("blocks.0.self_attn", "blocks.0.cross_attn")
    comfy_stacks = (("main", "blocks", "double_block"),)
    token_level = False


class ComfyQwenImage(ComfyFamily):
    """Qwen-Image (and its Edit variants): one stack of double-stream blocks, patched as ``double_block``.
    Step and block levels; its token level is not checked against ComfyUI's Qwen RoPE layout yet."""

    family, display_name, short_name = "qwen_image", "Qwen-Image", "Qwen-Image"
    model_classes = ("QwenImageTransformer2DModel",)
    file_keys = ("transformer_blocks.", "img_mod.")
    comfy_stacks = (("main", "transformer_blocks", "double_block"),)
    token_level = False


FAMILIES: tuple[type[ComfyFamily], ...] = (ComfyFlux, ComfyHunyuanVideo, ComfySD3, ComfyWan, ComfyQwenImage)
FAMILY_BY_ID: dict[str, type[ComfyFamily]] = {family.family: family for family in FAMILIES}


def supported_families() -> str:
    return ", ".join(f.display_name for f in FAMILIES)


def family_of_file(names) -> type[ComfyFamily] | None:
    """The family of a model file from its tensor names (with or without ComfyUI's ``diffusion_model.``), or None."""
    names = {k.split("diffusion_model.", 1)[-1] for k in names}
    return next((family for family in FAMILIES if family.recognises(names)), None)


def family_for(diffusion_model) -> ComfyFamily | None:
    """The family of a ComfyUI diffusion model (by its class or a base class), or None."""
    for cls in type(diffusion_model).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.model_classes:
                return family()
    return None
