"""Shared loopback Hub for the test suite: one `HubServer` on `conftest.HUB_PORT`, i.e. the port of the
`HF_ENDPOINT` that conftest set and every client library read at import (taken here from
`huggingface_hub.constants.ENDPOINT` so that it is exactly what the clients use). Started by the first test
that asks for it, stopped at interpreter exit."""

from __future__ import annotations

import atexit
import threading
import uuid

from urllib.parse import urlsplit

import pytest
from huggingface_hub import constants

from hub_server import HubServer

# Distinctive fake tokens, so a leak into a card, a log record or a file is easy to detect.
ALICE_TOKEN = "hf_alice_SECRET_token_1234567890abcdef"
BOB_TOKEN = "hf_bob_SECRET_token_0987654321fedcba"
TOKENS = {ALICE_TOKEN: "alice", BOB_TOKEN: "bob"}

_HUB: HubServer | None = None
_LOCK = threading.Lock()


def get_hub() -> HubServer:
    """The session-wide server (started on first use)."""
    global _HUB
    with _LOCK:
        if _HUB is None:
            endpoint = urlsplit(constants.ENDPOINT)
            if endpoint.hostname != "127.0.0.1" or endpoint.port is None:
                raise RuntimeError(f"HF_ENDPOINT must be a loopback URL set by conftest, got {constants.ENDPOINT}")
            _HUB = HubServer(port=endpoint.port, tokens=TOKENS).start()
            atexit.register(_HUB.stop)
        return _HUB


def unique_repo(name: str, user: str = "alice") -> str:
    return f"{user}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hub() -> HubServer:
    return get_hub()
