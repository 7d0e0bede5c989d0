"""pytest hooks of the bad-input and fault suite (imported by the conftest of tests/bad_input and tests/host): every case is marked ``bad_input(outcome)`` - "clear error" (refused with a
message that names the problem) or "survived" (a correct result, nothing lost). The run ends with one line:
``bad-input suite: N tried, X clear error, Y survived, Z failed``."""

import pytest

_RESULTS: list[tuple[str, bool]] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input(outcome, entry): a hostile or careless input and its expected outcome")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("bad_input")
    if marker is not None and report.when == "call":
        _RESULTS.append((marker.args[0], report.passed))


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    failed = sum(not ok for _, ok in _RESULTS)
    clear = sum(ok for kind, ok in _RESULTS if kind == "clear error")
    survived = sum(ok for kind, ok in _RESULTS if kind == "survived")
    terminalreporter.write_line(f"bad-input suite: {len(_RESULTS)} tried, {clear} clear error, {survived} survived, {failed} failed")
