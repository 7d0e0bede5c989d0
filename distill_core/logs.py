"""The trainer's messages go through ``logging`` (logger ``xslim``, as the node layer's); a command-line entry point
(the train command, the ComfyUI worker, the demo) shows them on standard output, one line each, flushed at once,
so a redirected job log reads as the run goes."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("xslim")


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message comes (a caller may have replaced it since)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_on_stdout(level: int = logging.INFO) -> None:
    """For a process's entry point only: print the pack's messages as they come (library code never calls this)."""
    if any(isinstance(h, _Stdout) for h in log.handlers):
        return
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
