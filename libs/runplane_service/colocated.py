"""The environment of a nats-server started beside the services, on the same machine.

Go's scheduler keeps spare threads spinning for work after each wake-up; on a small machine
shared with the Python services that spin is CPU taken from them. Unless the caller set
GOMAXPROCS, an embedded server gets half the cores (at least one). On this 2-core VM, in 7
pairs of runs of 2,000 sequential /runsync calls, the server's share of all CPU spent was
19.5-23.4 % with one against 22.6-27.2 % with two; in /run throughput runs its CPU per job was
170-209 us against 197-257, with jobs/s the same or better.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def nats_server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if not env.get("GOMAXPROCS"):
        env["GOMAXPROCS"] = str(max(1, (os.cpu_count() or 1) // 2))
    return env
