"""Module-scoped fixtures shared by the node agent's integration tests: one nats-server,
one bus connection and one running agent per test module."""

from __future__ import annotations

import pytest
import pytest_asyncio

from node_agent_harness import connected, running_agent
from runplane_testing.natsserver import NatsServer


@pytest.fixture(scope="module")
def nats():
    with NatsServer() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bus(nats):
    async with connected(nats.url) as b:
        yield b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(nats, request):
    """A node agent; a module may set AGENT_OPTIONS (keyword settings for running_agent)."""
    async with running_agent(nats.url, **getattr(request.module, "AGENT_OPTIONS", {})) as a:
        yield a
