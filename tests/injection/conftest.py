"""Prints the injection suite's detection and false-positive rates after the run."""

from __future__ import annotations

from typing import Any

REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("prompt-injection suite")
        for block in REPORT:
            terminalreporter.write_line(block)
