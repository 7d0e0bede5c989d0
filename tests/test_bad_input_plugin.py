"""The bad-input suite's summary line counts every marked case once, by its worst phase, and is printed once."""

import os

pytest_plugins = "pytester"

CASES = '''
import pytest

@pytest.fixture()
def broken():
    raise RuntimeError("fixture error")

@pytest.mark.bad_input("clear error")
def test_refused():
    pass

@pytest.mark.bad_input("survived")
def test_survived():
    pass

@pytest.mark.bad_input("clear error")
def test_wrong():
    assert False

@pytest.mark.bad_input("survived")
def test_fixture_breaks(broken):
    pass

@pytest.mark.bad_input("survived")
def test_skips_in_its_body():
    pytest.skip("an optional tool is missing")

@pytest.mark.bad_input("clear error")
@pytest.mark.skip(reason="skipped by a marker")
def test_skipped_by_marker():
    pass

def test_unmarked():
    pass
'''
CONFTEST = "import sys; sys.path.insert(0, {folder!r})\nfrom bad_input_plugin import pytest_configure, pytest_runtest_makereport, pytest_terminal_summary  # noqa\n"


def test_the_summary_counts_fixture_errors_as_failed_and_skips_apart_once_per_session(pytester):
    folder = os.path.dirname(os.path.abspath(__file__))
    for sub in ("bad_input", "host"):  # both conftests load the plugin, as in `pytest tests`
        pytester.mkpydir(sub)
        pytester.path.joinpath(sub, "conftest.py").write_text(CONFTEST.format(folder=folder))
        pytester.path.joinpath(sub, f"test_{sub}_cases.py").write_text(CASES)
    result = pytester.runpytest("-p", "no:cacheprovider")
    lines = [line for line in result.outlines if line.startswith("bad-input suite:")]
    assert lines == ["bad-input suite: 12 tried, 2 clear error, 2 survived, 4 failed, 4 skipped"]
    result.assert_outcomes(passed=6, failed=2, errors=2, skipped=4)
