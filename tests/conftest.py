"""Test-session set-up. The Hub endpoint and caches are fixed here, before any test module imports
huggingface_hub, transformers or datasets (they read the endpoint at import time)."""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = _free_port()
_HF_HOME = tempfile.mkdtemp(prefix="hf_clipneg_tests_home_")
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The converted packaged vision tower is cached across test sessions, outside the throwaway HF_HOME.
os.environ.setdefault("HF_CLIPNEG_CACHE", os.path.join(tempfile.gettempdir(), "hf_clipneg_cache"))

import pytest  # noqa: E402


@pytest.fixture
def tiny_dual_encoder():
    """A fresh tiny random ViT+BERT dual encoder and its processor."""
    from hf_clipneg.testing import build_tiny_dual_encoder

    return build_tiny_dual_encoder()
