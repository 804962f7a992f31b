"""Fixtures shared by the test modules. Plain helpers (tiny models, batches, run settings) live in the helper
modules beside it: llm_fixtures.py, encoder_fixtures.py and federation_fixtures.py."""

from pathlib import Path

import pytest
from llm_fixtures import save_tiny_llm


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache for one test (prepared datasets, item features): nothing another test wrote is reused."""
    monkeypatch.setenv("FED_USERLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama and its word tokenizer, saved once per session; tests only read it."""
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
