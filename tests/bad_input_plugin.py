"""pytest hooks of the bad-input and fault suite (imported by the conftest of tests/bad_input and tests/host): every case is marked ``bad_input(outcome)`` - "clear error" (refused with a
message that names the problem) or "survived" (a correct result, nothing lost). The run ends with one line:
``bad-input suite: N tried, X clear error, Y survived, Z failed, S skipped``.

Every marked case counts once, by its worst phase: an error in a fixture (setup) or in teardown is a failure, so
a broken case never drops out of "tried"; a skip (a missing optional tool, ComfyUI absent) is shown apart, as it
showed nothing either way. Both conftests register these hooks, so results are kept per session (one entry per
test id) and the line is printed once."""

import pytest

_RESULTS = pytest.StashKey[dict]()  # test id -> (expected outcome, "passed" | "failed" | "skipped")
_PRINTED = pytest.StashKey[bool]()


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input(outcome, entry): a hostile or careless input and its expected outcome")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("bad_input")
    if marker is None:
        return
    results = item.config.stash.setdefault(_RESULTS, {})
    _, before = results.get(item.nodeid, (None, None))
    now = _phase_outcome(report)
    if now is not None and before != "failed":  # a skipped setup has no call phase that could pass after it
        results[item.nodeid] = (marker.args[0], now)


def _phase_outcome(report) -> str | None:
    """What this phase says about the case: setup and teardown only ever make it worse (failed or skipped)."""
    if report.failed:
        return "failed"
    if report.skipped:
        return "skipped"
    return "passed" if report.when == "call" else None


def pytest_terminal_summary(terminalreporter, config):
    results = list(config.stash.get(_RESULTS, {}).values())
    if not results or config.stash.get(_PRINTED, False):
        return
    config.stash[_PRINTED] = True
    count = {o: sum(outcome == o for _, outcome in results) for o in ("failed", "skipped")}
    clear = sum(kind == "clear error" and outcome == "passed" for kind, outcome in results)
    survived = sum(kind == "survived" and outcome == "passed" for kind, outcome in results)
    terminalreporter.write_line(f"bad-input suite: {len(results)} tried, {clear} clear error, {survived} survived, "
                                f"{count['failed']} failed, {count['skipped']} skipped")
