"""Host tests run against a real ComfyUI; without one (or without its requirements) they skip, saying why."""

import pytest

import comfy_env

REASON = comfy_env.import_comfy()


def pytest_collection_modifyitems(config, items):
    if REASON:
        for item in items:
            if "tests/host/" in str(item.fspath).replace("\\", "/"):
                item.add_marker(pytest.mark.skip(reason=REASON))


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
