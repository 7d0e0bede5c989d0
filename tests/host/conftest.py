"""Host tests run against a real ComfyUI; without one (or without its requirements) they skip, saying why."""

import os

import pytest

import comfy_env

REASON = comfy_env.import_comfy()


# `make test` runs this suite on every ComfyUI host it finds and sets XSLIM_SKIP_ONCE=1 on all but one: a case
# marked `once` (a long end-to-end run whose host-specific parts other tests already cover) runs on that one only
ONCE_ELSEWHERE = "runs once per `make test`, on the newest ComfyUI host present (XSLIM_SKIP_ONCE=1 here)"


def pytest_collection_modifyitems(config, items):
    skip_once = os.environ.get("XSLIM_SKIP_ONCE") == "1"
    for item in items:
        if "tests/host/" not in str(item.fspath).replace("\\", "/"):
            continue
        if REASON:
            item.add_marker(pytest.mark.skip(reason=REASON))
        elif skip_once and item.get_closest_marker("once"):
            item.add_marker(pytest.mark.skip(reason=ONCE_ELSEWHERE))


@pytest.fixture(scope="session")
def pack():
    return comfy_env.load_pack()


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    """ComfyUI's user folder (where profiles are saved) in a temporary place."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    return tmp_path


from bad_input_plugin import pytest_configure, pytest_runtest_makereport, pytest_terminal_summary  # noqa: E402,F401  (the bad-input suite's summary line)
