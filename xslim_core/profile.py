"""A profile: what one uncached run of a model looked like, over sigma. Saved as JSON (never pickled)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import InitVar, asdict, dataclass, field

from .files import atomic_path

FORMAT = "xslim-profile/1"
MAX_BYTES = 8 * 10**6  # a 1000-step profile of a 60-block model is about 1 MB
MAX_STEPS = 10_000
MAX_BLOCKS = 1_000


@dataclass
class Profile:
    """Per-step change curve and per-block profile of one uncached sampling run.

    ``sigmas``: the run's schedule (T+1 values, last one usually 0).
    ``step_change[k]``: mean |delta_k - delta_{k-1}| of the step residual at step k (k = 1..T-1; index 0 is 0).
    ``block_change[k][l]``: mean |out_l - in_l| of block l (image tokens) at step k.
    ``stacks``: (name, number of blocks) in block order, e.g. [("double", 19), ("single", 38)].

    Every profile is checked when it is made, in memory as from a file: a NaN, a negative change or 200k steps
    would otherwise silently change (or stall) the plan. ``source`` names the profile in those messages.
    """

    family: str
    sigmas: list[float]
    step_change: list[float]
    block_change: list[list[float]]
    stacks: list[tuple[str, int]]
    meta: dict = field(default_factory=dict)
    source: InitVar[str] = "profile"

    def __post_init__(self, source: str):
        check_fields(self, source)

    @property
    def num_steps(self) -> int:
        return len(self.step_change)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<string>") -> "Profile":
        """Parse and check a profile; anything malformed, oversized or non-finite is refused by name."""
        if len(text) > MAX_BYTES:
            raise ValueError(
                f"X-Slim: {source} is {len(text) / 1e6:.1f} MB; a profile is at most {MAX_BYTES // 10**6} MB."
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # also undecodable bytes and absurd nesting
            raise ValueError(f"X-Slim: {source} is not a profile file (invalid JSON: {type(err).__name__}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"X-Slim: {source} is not an X-Slim profile (expected format {FORMAT!r}).")
        data.pop("format")
        try:
            return cls(**data, source=source)
        except TypeError as err:
            raise ValueError(f"X-Slim: {source} has unexpected fields: {err}.") from None

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write atomically through a unique temporary file in the same folder (never a pre-placed one, never
        through a link); an existing file is kept unless ``overwrite``."""
        with atomic_path(path, overwrite) as tmp, open(tmp, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        size = os.path.getsize(path)
        if size > MAX_BYTES:  # refused before reading
            raise ValueError(f"X-Slim: {path} is {size / 1e6:.1f} MB; a profile is at most {MAX_BYTES // 10**6} MB.")
        with open(path, "rb") as f:
            return cls.from_json(f.read(), source=str(path))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_list(value, name: str, source: str, minimum: float = -math.inf) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"X-Slim: {source}: {name} must be a list of numbers, got {value!r:.60} ({type(value).__name__})."
        )
    wrong = [v for v in value if not _is_number(v)][:1]
    if wrong:
        raise ValueError(
            f"X-Slim: {source}: {name} must be a list of numbers; it holds {wrong[0]!r:.60} ({type(wrong[0]).__name__})."
        )
    for i, v in enumerate(value):
        if not (math.isfinite(v) and v >= minimum):
            accepted = "finite numbers" + (f" >= {minimum:g}" if minimum > -math.inf else "")
            raise ValueError(
                f"X-Slim: {source}: {name}[{i}] is {v!r}, which is not finite or out of range (accepted: "
                f"{accepted}); record the profile again."
            )
    return [float(v) for v in value]


def check_fields(prof: Profile, source: str) -> None:
    """Types, finiteness, sizes and consistency; the step count first, so a huge profile is refused before any
    long list is walked."""
    if not isinstance(prof.family, str):
        raise ValueError(f"X-Slim: {source}: family must be a model family name (a string), got {prof.family!r:.60}.")
    steps = len(prof.step_change) if isinstance(prof.step_change, (list, tuple)) else None
    if steps is not None and not 2 <= steps <= MAX_STEPS:  # one step has no change between steps to plan from
        raise ValueError(
            f"X-Slim: {source} has {steps} steps (step_change); a profile has 2..{MAX_STEPS}. Record it "
            "with the step count you usually sample with."
        )
    if not isinstance(prof.stacks, (list, tuple)) or not all(
        isinstance(s, (list, tuple))
        and len(s) == 2
        and isinstance(s[0], str)
        and isinstance(s[1], int)
        and not isinstance(s[1], bool)
        and 0 < s[1] <= MAX_BLOCKS
        for s in prof.stacks
    ):
        raise ValueError(
            f"X-Slim: {source}: stacks must be [name, block count] pairs (1..{MAX_BLOCKS} blocks), "
            f"got {prof.stacks!r:.80}."
        )
    prof.stacks = [(str(name), int(count)) for name, count in prof.stacks]
    prof.sigmas = _finite_list(prof.sigmas, "sigmas", source)
    prof.step_change = _finite_list(prof.step_change, "step_change", source, minimum=0.0)
    if (
        len(prof.sigmas) != prof.num_steps + 1
        or not isinstance(prof.block_change, (list, tuple))
        or len(prof.block_change) != prof.num_steps
    ):
        raise ValueError(
            f"X-Slim: {source} is inconsistent (sigmas, step and block curves differ in length): "
            f"{len(prof.sigmas)} sigmas, {prof.num_steps} step_change values, "
            f"{len(prof.block_change) if isinstance(prof.block_change, (list, tuple)) else prof.block_change!r:.40} block_change rows; "
            "a profile of T steps has T+1 sigmas and T of each."
        )
    blocks = sum(n for _, n in prof.stacks)
    prof.block_change = [_finite_list(row, "block_change", source, minimum=0.0) for row in prof.block_change]
    if any(len(row) != blocks for row in prof.block_change):
        raise ValueError(f"X-Slim: {source}: every block_change row must have one value per block ({blocks}).")
    if not isinstance(prof.meta, dict):
        raise ValueError(f"X-Slim: {source}: meta must be a dict, got {prof.meta!r:.60}.")
