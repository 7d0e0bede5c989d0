"""The bad-input and fault suite of the engine and trainer APIs (the nodes and server cases are in tests/host)."""

from bad_input_plugin import pytest_configure, pytest_runtest_makereport, pytest_terminal_summary  # noqa: F401
