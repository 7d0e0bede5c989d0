"""The trainer's command lines as a user drives them: their --help names only what exists, a prompt list is
encoded from the command line, any student samples from the command line, and the trainer's output reads well
in a redirected log."""

from __future__ import annotations

import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every command line of the trainer and its measuring tools (python -m NAME)
COMMANDS = ("distill_core.train", "distill_core.worker", "xslim_lab.distill_sample",
            "xslim_lab.distill_demo", "xslim_lab.distill_evaluate", "xslim_lab.memory_bench")


def _help(module: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def repository_paths(text: str) -> list[str]:
    """The repository paths a text names: words with a '/' whose first part is an entry of the repository root."""
    top = set(os.listdir(REPO))
    words = re.findall(r"[A-Za-z_][\w.-]*(?:/[\w.-]*)+", text)
    return [w.rstrip(".,;:") for w in words if w.split("/", 1)[0] in top]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_path_a_help_text_names_exists(module, capsys):
    text = _help(module, capsys)
    named = repository_paths(text)
    missing = [p for p in named if not os.path.exists(os.path.join(REPO, p))]
    assert not missing, f"python -m {module} --help names {missing}, which the repository does not have:\n{text}"


def test_the_path_finder_sees_a_missing_folder():
    assert repository_paths("run config JSON (see distill_core/configs/)") == ["distill_core/configs/"]
    assert repository_paths("latent side (tokens = (side/2)^2), ~/.cache/xslim") == []
