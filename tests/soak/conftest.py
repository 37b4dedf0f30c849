"""The soak runs only when asked for (`make soak`: `pytest -m soak`); the default suite skips it
with that reason."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "soak" in (config.option.markexpr or "") and "not soak" not in config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="soak test: 30 simulated minutes; run it with `make soak`")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)
