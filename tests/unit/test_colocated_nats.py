"""An embedded nats-server gets half the cores unless GOMAXPROCS was set; the server started
for the tests runs with it."""

from __future__ import annotations

import os

from runplane_service.colocated import nats_server_env
from runplane_testing.natsserver import NatsServer


def test_half_the_cores_unless_set(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert nats_server_env({"PATH": "/bin"}) == {"PATH": "/bin", "GOMAXPROCS": "1"}
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert nats_server_env({})["GOMAXPROCS"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert nats_server_env({})["GOMAXPROCS"] == "8"
    assert nats_server_env({"GOMAXPROCS": "3"})["GOMAXPROCS"] == "3"
    assert nats_server_env({"GOMAXPROCS": ""})["GOMAXPROCS"] == "8"


def test_the_started_server_has_it() -> None:
    with NatsServer() as server:
        assert server.proc is not None
        environ = open(f"/proc/{server.proc.pid}/environ", "rb").read().split(b"\0")
    assert f"GOMAXPROCS={nats_server_env()['GOMAXPROCS']}".encode() in environ
