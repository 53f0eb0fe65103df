from __future__ import annotations

import pytest

from runplane_testing.natsserver import NatsServer


@pytest.fixture
def nats_server():
    with NatsServer() as server:
        yield server
