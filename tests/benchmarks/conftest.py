"""`make bench`: each benchmark leaves a ratio measured in one run; the summary prints them."""

import pytest

RATIOS: dict[str, float] = {}


@pytest.fixture
def record_ratio():
    def record(name: str, value: float) -> None:
        RATIOS[name] = value
    return record


def pytest_terminal_summary(terminalreporter):
    for name, value in RATIOS.items():
        terminalreporter.write_line(f"{name}: {value:.3f}")
