"""Training conditioning: a prompt list, encoded once outside the training loop and stored with the run.

Distillation needs no images (the teacher provides the distribution), only what the model is conditioned on.
A ``PromptSet`` holds the encoder's output for every prompt (sequence, pooled vector, mask) and for the
unconditional prompt, in one safetensors file in the run folder; the trainer draws batches through a
``PromptCursor`` whose position is saved with each checkpoint, so a resumed run sees the prompts it would
have seen. For the demo teacher the "prompts" are its class names and the "encoder" is its class table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .files import save_atomic

PROMPT_SET_FORMAT = "xslim-prompt-set/1"
MAX_PROMPT_FILE_BYTES = 16 * 1024 * 1024


@dataclass
class Conditioning:
    """A batch of conditioning, row-aligned with the latents: ``context`` [B, L, D], ``pooled`` [B, P] or None,
    ``mask`` [B, L] or None (1 = a real token)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def rows(self, index) -> "Conditioning":
        pick = lambda t: None if t is None else t[index]
        return Conditioning(self.context[index], pick(self.pooled), pick(self.mask))

    def to(self, device=None, dtype=None) -> "Conditioning":
        move = lambda t, d: None if t is None else t.to(device=device, dtype=d)
        return Conditioning(
            self.context.to(device=device, dtype=dtype), move(self.pooled, dtype), move(self.mask, None)
        )

    def expand(self, n: int) -> "Conditioning":
        """A one-row conditioning (e.g. the unconditional prompt) repeated ``n`` times."""
        grow = lambda t: None if t is None else t.expand(n, *t.shape[1:])
        return Conditioning(self.context.expand(n, *self.context.shape[1:]), grow(self.pooled), grow(self.mask))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        join = lambda ts: None if ts[0] is None else torch.cat(ts)
        return Conditioning(
            torch.cat([p.context for p in parts]), join([p.pooled for p in parts]), join([p.mask for p in parts])
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.context": self.context}
        if self.pooled is not None:
            out[f"{prefix}.pooled"] = self.pooled
        if self.mask is not None:
            out[f"{prefix}.mask"] = self.mask
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}


class PromptSet:
    """Every prompt's conditioning ([N, ...]) and the unconditional one ([1, ...])."""

    def __init__(self, prompts: list[str], cond: Conditioning, uncond: Conditioning, kind: str = "text"):
        if len(prompts) == 0:
            raise ValueError("the prompt set is empty: give at least one prompt.")
        if len(cond) != len(prompts):
            raise ValueError(f"the prompt set has {len(prompts)} prompts but {len(cond)} encoded rows.")
        if len(uncond) != 1:
            raise ValueError(f"the unconditional prompt must be one row, got {len(uncond)}.")
        if uncond.context.shape[1:] != cond.context.shape[1:]:
            raise ValueError(
                f"the unconditional prompt is encoded as {tuple(uncond.context.shape[1:])} but the prompts "
                f"as {tuple(cond.context.shape[1:])}; encode both with the same text encoder settings."
            )
        self.prompts, self.cond, self.uncond, self.kind = list(prompts), cond, uncond, kind

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index: torch.Tensor) -> Conditioning:
        return self.cond.rows(index)

    @property
    def encoder_shape(self) -> dict:
        """What the model must accept: sequence width, pooled width (shapes checked against the model)."""
        return {
            "context": list(self.cond.context.shape[1:]),
            "pooled": None if self.cond.pooled is None else list(self.cond.pooled.shape[1:]),
        }

    def content_hash(self) -> str:
        """Identifies the prompts and their encoding; a resume with a different set is refused."""
        h = hashlib.sha256(json.dumps(self.prompts).encode())
        for name, t in sorted({**self.cond.tensors("cond"), **self.uncond.tensors("uncond")}.items()):
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str, overwrite: bool = True) -> None:
        tensors = {**self.cond.tensors("cond"), **self.uncond.tensors("uncond")}
        save_atomic(
            tensors,
            path,
            {
                "format": PROMPT_SET_FORMAT,
                "kind": self.kind,
                "prompts": json.dumps(self.prompts),
                "hash": self.content_hash(),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: str) -> "PromptSet":
        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable prompt-set file ({err}).") from None
        if meta.get("format") != PROMPT_SET_FORMAT:
            raise ValueError(
                f"{path} is not a prompt-set file (format {meta.get('format')!r}, expected {PROMPT_SET_FORMAT!r})."
            )
        if "cond.context" not in tensors or "uncond.context" not in tensors:
            raise ValueError(f"{path} lacks the encoded prompts (cond.context / uncond.context).")

        def part(prefix):
            return Conditioning(
                tensors[f"{prefix}.context"], tensors.get(f"{prefix}.pooled"), tensors.get(f"{prefix}.mask")
            )

        return cls(
            _prompt_list(path, meta.get("prompts", "[]")), part("cond"), part("uncond"), meta.get("kind", "text")
        )

    def check_model(self, context_dim: int | None, pooled_dim: int | None, what: str) -> None:
        """Refuse a prompt set encoded for another text encoder before anything trains."""
        got_ctx = self.cond.context.shape[-1]
        got_pool = None if self.cond.pooled is None else self.cond.pooled.shape[-1]
        if context_dim is not None and got_ctx != context_dim:
            raise ValueError(
                f"the prompt set was encoded {got_ctx} wide but {what} takes text conditioning {context_dim} "
                "wide: it was encoded by another text encoder; encode the prompt list again for this model."
            )
        if pooled_dim is not None and got_pool != pooled_dim:
            raise ValueError(
                f"the prompt set's pooled vectors are {got_pool} wide but {what} takes {pooled_dim}: "
                "encode the prompt list again for this model."
            )


def _prompt_list(path: str, raw: str) -> list[str]:
    """The ``prompts`` metadata of a prompt-set file: a JSON list of strings, else refused naming the file (a
    string would be taken as one prompt per character, a list of numbers as prompts)."""
    try:
        prompts = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(
            f"{path}: its 'prompts' metadata is not JSON ({raw[:60]!r}); the file is damaged. Encode the "
            "prompt list again."
        ) from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"{path}: its 'prompts' metadata must be a list of prompt texts, got {type(prompts).__name__} "
            f"{raw[:60]!r}; the file is damaged. Encode the prompt list again."
        )
    return prompts


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with '#' are skipped."""
    with open(path, "rb") as f:
        raw = f.read(MAX_PROMPT_FILE_BYTES + 1)
    if len(raw) > MAX_PROMPT_FILE_BYTES:
        raise ValueError(
            f"{path} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MB; a prompt list is a text file with one prompt per line."
        )
    if b"\x00" in raw:
        raise ValueError(
            f"{path} is not a text file (it contains NUL bytes); give a UTF-8 text file with one prompt per line."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8, one prompt per line."
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line.")
    return prompts


class PromptCursor:
    """Draws prompt indices epoch by epoch through seeded permutations; its position is part of the training
    state, so a resumed run continues with exactly the prompts the uninterrupted run would have drawn."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))

    def next(self, batch: int) -> torch.Tensor:
        """This rank's ``batch`` indices of the next global batch (ranks take disjoint slices of it)."""
        wanted, out = batch * self.world, []
        while wanted:
            order = self._order()
            take = min(wanted, self.size - self.position)
            out.append(order[self.position : self.position + take])
            self.position += take
            wanted -= take
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(out)[self.rank * batch : (self.rank + 1) * batch]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load(self, state: dict) -> None:
        if int(state.get("size", self.size)) != self.size:
            raise ValueError(f"the saved prompt cursor is for {state.get('size')} prompts, this run has {self.size}.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def encode_prompt_set(prompts: list[str], encode, negative: str = "", kind: str = "text") -> PromptSet:
    """Encode a prompt list once, in chunks, with the host's text encoder: ``encode(list[str]) -> Conditioning``
    (ComfyUI's CLIP, a diffusers pipeline's ``encode_prompt``...). ``negative`` is the unconditional prompt."""
    if not prompts:
        raise ValueError("the prompt list is empty: give at least one prompt.")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("every prompt must be non-empty text.")
    parts = [encode(prompts[i : i + 16]) for i in range(0, len(prompts), 16)]
    with torch.no_grad():
        return PromptSet(prompts, Conditioning.cat(parts), encode([negative]), kind)
