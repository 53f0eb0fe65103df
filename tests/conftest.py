from __future__ import annotations

import os

import pytest

from runplane_testing.natsserver import NatsServer


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server


# GPU tests run only where a GPU is lent: ./scripts/test-gpu sets RP_GPU_TESTS=1.
collect_ignore = [] if os.environ.get("RP_GPU_TESTS") == "1" else ["gpu"]
