"""A profile: what one uncached run of a model looked like, over sigma. Saved as JSON (never pickled)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

FORMAT = "xslim-profile/1"


@dataclass
class Profile:
    """Per-step change curve and per-block profile of one uncached sampling run.

    ``sigmas``: the run's schedule (T+1 values, last one usually 0).
    ``step_change[k]``: mean |delta_k - delta_{k-1}| of the step residual at step k (k = 1..T-1; index 0 is 0).
    ``block_change[k][l]``: mean |out_l - in_l| of block l (image tokens) at step k.
    ``stacks``: (name, number of blocks) in block order, e.g. [("double", 19), ("single", 38)].
    """

    family: str
    sigmas: list[float]
    step_change: list[float]
    block_change: list[list[float]]
    stacks: list[tuple[str, int]]
    meta: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.step_change)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "Profile":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"X-Slim: {source} is not a profile file (invalid JSON: {err}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"X-Slim: {source} is not an X-Slim profile (expected format {FORMAT!r}).")
        data.pop("format")
        try:
            prof = cls(**data)
        except TypeError as err:
            raise ValueError(f"X-Slim: {source} has unexpected fields: {err}.") from None
        prof.stacks = [tuple(s) for s in prof.stacks]
        if len(prof.sigmas) != prof.num_steps + 1 or len(prof.block_change) != prof.num_steps:
            raise ValueError(f"X-Slim: {source} is inconsistent (sigmas, step and block curves differ in length).")
        return prof

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        with open(path) as f:
            return cls.from_json(f.read(), source=str(path))
