"""The text-conditioned demo teacher: an SD3-shaped transformer and a tiny text encoder, trained on Fashion-MNIST.

Why SD3 at width 256 and 4 blocks: ComfyUI's MMDiT detection ties the width to the depth (hidden = 64 x blocks,
heads = blocks), so 4 blocks must be 256 wide, which is about 8 M parameters - small enough for two CPU cores.
The file keeps diffusers' key names: diffusers builds the model from the architecture in the metadata, and
ComfyUI's UNETLoader converts diffusers MMDiT keys itself (its SD3 path), so no key table of ours is involved.

Latents are the demo's weight-free transform (a 28x28 image padded to 32x32 and pixel-unshuffled by 4 into
16 x 8 x 8) without the frame axis, patched 2x2 by the model: 16 image tokens. Prompts ("a sneaker", "a photo of
a bag") are tokenised by words over a fixed vocabulary and encoded by ``TinyTextEncoder`` (2 transformer layers,
64 wide): a context of 8 tokens and a pooled vector. The empty prompt is the CFG null prompt.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from xslim_core.families import family_spec, model_times
from xslim_core.files import atomic_path

from .teacher import CLASSES, WEIGHTS_DIR

FORMAT = "xslim-demo-text-teacher/1"
ENCODER_FORMAT = "xslim-demo-text-encoder/1"
TEXT_LENGTH, TEXT_WIDTH = 8, 64
LATENT_SHAPE = (16, 8, 8)  # SD3 layout: no frame axis
# ComfyUI's SD3 latent format: model-space latent = (LATENT - shift) x scale
COMFY_SD3_SCALE, COMFY_SD3_SHIFT = 1.5305, 0.0609
SAMPLING_SHIFT = 3.0  # ComfyUI samples SD3 with shift 3; the pack's own samplers of this teacher do the same

ARCHITECTURE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=TEXT_WIDTH,
    caption_projection_dim=256,
    pooled_projection_dim=TEXT_WIDTH,
    pos_embed_max_size=8,
)

# What each class may be called; a prompt is a template around one of them.
NAMES = [
    ["t-shirt", "top", "tee"],
    ["trousers", "pants", "jeans"],
    ["pullover", "sweater", "jumper"],
    ["dress"],
    ["coat", "jacket"],
    ["sandal"],
    ["shirt", "blouse"],
    ["sneaker", "trainer", "running shoe"],
    ["bag", "handbag", "purse"],
    ["ankle boot", "boot"],
]
TEMPLATES = ["{a} {n}", "{n}", "a photo of {a} {n}", "a picture of {a} {n}", "a drawing of {a} {n}"]
SPECIAL = ["<pad>", "<unk>"]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower())


def vocabulary() -> list[str]:
    words = {w for names in NAMES for name in names for w in _words(name)}
    words |= {w for t in TEMPLATES for a in ("a", "an") for w in _words(t.format(a=a, n=""))}
    return SPECIAL + sorted(words)


def tokenize(prompts: list[str], vocab: list[str]) -> torch.Tensor:
    """Word ids [B, TEXT_LENGTH]: known words in order, unknown ones as <unk>, padded (or cut) to the length."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = []
    for prompt in prompts:
        ids = [index.get(w, 1) for w in _words(prompt)][:TEXT_LENGTH]
        rows.append(ids + [0] * (TEXT_LENGTH - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def class_prompt(label: int, gen: torch.Generator) -> str:
    """A random prompt for a class: one of its names in one of the templates."""
    names = NAMES[label]
    name = names[int(torch.randint(len(names), (1,), generator=gen))]
    template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=gen))]
    return template.format(a=article(name), n=name)


def default_prompt(label: int) -> str:
    """The class's first name with its article: "a t-shirt", "an ankle boot"."""
    name = NAMES[label][0]
    return f"{article(name)} {name}"


class TinyTextEncoder(nn.Module):
    """Word embeddings + positions, 2 pre-norm transformer layers: context [B, 8, 64] and pooled [B, 64]. Padding
    is attended like any token (no mask), so the empty prompt has a well-defined encoding: the null prompt."""

    def __init__(self, vocab_size: int, width: int = TEXT_WIDTH, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(TEXT_LENGTH, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.encoder(self.embed(ids) + self.position))
        return h, self.pool(h.mean(dim=1))


def build_model(architecture: dict | None = None) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**(architecture or ARCHITECTURE))


def velocity(model: nn.Module, encoder: TinyTextEncoder, x: torch.Tensor, sigma, ids: torch.Tensor) -> torch.Tensor:
    """The model's velocity (noise - x0) for SD3-layout latents ``x`` [B, 16, 8, 8] given word ids [B, 8]."""
    context, pooled = encoder(ids)
    t = model_times(sigma, x, family_spec("sd3").time_scale)
    return model(
        hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled, return_dict=False
    )[0]


# -- files ------------------------------------------------------------------------------------------------
def default_weights_path() -> str:
    return os.path.join(WEIGHTS_DIR, "demo_text_teacher.safetensors")


def encoder_path(weights_path: str) -> str:
    return weights_path.replace(".safetensors", ".text_encoder.safetensors")


def save_text_teacher(path: str, model: nn.Module, encoder: TinyTextEncoder, vocab: list[str], meta: dict) -> None:
    """The transformer (diffusers keys, what UNETLoader reads) and, beside it, the text encoder with its vocabulary."""
    model_meta = {"format": FORMAT, "family": "sd3", "architecture": json.dumps(ARCHITECTURE),
                  "latent": "fashion-mnist 28x28 -> pad 32 -> pixel_unshuffle 4 -> [16, 8, 8]",
                  "prediction": "flow velocity (noise - x0), x_t = (1 - sigma) x0 + sigma noise, timestep = sigma x 1000",
                  "classes": json.dumps(CLASSES), **meta}  # fmt: skip
    _save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path, model_meta)
    enc_meta = {"format": ENCODER_FORMAT, "vocabulary": json.dumps(vocab), "length": str(TEXT_LENGTH)}
    _save({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, encoder_path(path), enc_meta)


def _save(tensors: dict, path: str, metadata: dict) -> None:
    with atomic_path(path, overwrite=True, mode=0o644) as tmp:  # --export replaces the shipped file by design
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})


def _read(path: str, expected: str) -> tuple[dict, dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Text demo teacher file {path} not found.")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta.get("format") == expected else None
    except Exception as err:  # safetensors raises several types for a damaged header or body
        raise ValueError(f"{path} could not be read as safetensors ({err}).") from None
    if tensors is None:
        raise ValueError(f"{path} is not a {expected} file (format {meta.get('format')!r}).")
    return tensors, meta


class TextTeacher:
    """The loaded text teacher: diffusers transformer, text encoder and vocabulary."""

    def __init__(self, model: nn.Module, encoder: TinyTextEncoder, vocab: list[str], meta: dict):
        self.model, self.encoder, self.vocab, self.meta = model, encoder, vocab, meta

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.encoder(tokenize(prompts, self.vocab))

    def velocity_fn(self, prompts: list[str], null_prompt: str = ""):
        """fn(x, sigma) for xslim_demo.sampling; a doubled batch is [null rows, prompt rows] (CFG)."""
        ids = tokenize(prompts, self.vocab)
        null = tokenize([null_prompt] * len(prompts), self.vocab)

        @torch.no_grad()
        def fn(x, sigma):
            rows = torch.cat([null, ids]) if x.shape[0] == 2 * len(prompts) else ids
            return velocity(self.model, self.encoder, x, sigma, rows)

        return fn


def load_text_encoder(path: str | None = None) -> tuple[TinyTextEncoder, list[str]]:
    """The text encoder beside a text teacher file (default: the shipped one) and its vocabulary."""
    tensors, meta = _read(encoder_path(path or default_weights_path()), ENCODER_FORMAT)
    vocab = json.loads(meta["vocabulary"])
    encoder = TinyTextEncoder(len(vocab))
    encoder.load_state_dict(tensors)
    return encoder.eval(), vocab


def load_text_teacher(path: str | None = None) -> TextTeacher:
    """The transformer (diffusers' SD3Transformer2DModel, built from the file's architecture) and its text encoder."""
    path = path or default_weights_path()
    tensors, meta = _read(path, FORMAT)
    model = build_model(json.loads(meta["architecture"]))
    model.load_state_dict(tensors)
    encoder, vocab = load_text_encoder(path)
    return TextTeacher(model.eval(), encoder, vocab, meta)


@torch.no_grad()
def prompt_grid(teacher: TextTeacher, path: str, steps: int = 50, cfg: float = 2.0, per_class: int = 8) -> None:
    """One row per class, sampled from each class's default prompt ("a sneaker"), written as PNG."""
    from .grid import class_noise, images_to_grid
    from .latents import latent_to_image
    from .sampling import flow_sigmas, sample_euler

    noise, labels = class_noise(per_class)
    prompts = [default_prompt(int(y)) for y in labels]
    latents = sample_euler(
        teacher.velocity_fn(prompts), noise.squeeze(2), flow_sigmas(steps, SAMPLING_SHIFT), cfg_scale=cfg
    )
    names = [default_prompt(i) for i in range(len(CLASSES))]
    images_to_grid(latent_to_image(latents.unsqueeze(2)), len(CLASSES), names).save(path)
