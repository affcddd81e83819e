import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny models' tokenizer (byte-level BPE, ChatML template), built once per test session."""
    from megarl.utils.tiny_models import build_tokenizer

    return build_tokenizer()
