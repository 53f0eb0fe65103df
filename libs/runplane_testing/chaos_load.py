"""The chaos campaign's load: `run`, `runsync`, streamed and cancelled jobs spread over every
gateway, at a seeded random mix and pace.

A submit that got no answer (connection refused or reset, timeout: the gateway died) may
still have been accepted, so it is noted as "maybe accepted" and sent again to another
gateway; a job id counts as accepted only once a gateway returned it. What each client saw
of a job (a `/runsync` or `/status` output, `/stream` chunks) is kept to check that no job
was ever shown another job's result.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from runplane_testing.chaos_accounting import Delivery, Submitted

# Weights of the operations in the mix.
MIX = {"run": 4, "runsync": 3, "stream": 2, "cancel": 1}
SUBMIT_TRIES = 6  # each on the next gateway, while none answers
STATUS_POLL_S = 1.0


@dataclass
class Load:
    gateway_urls: list[str]
    api_key: str
    endpoints: dict[str, str]  # "echo" / "stream" -> endpoint id
    seed: int = 1
    rate_per_s: float = 3.0
    max_in_flight: int = 48
    phase: str = "floor"
    accepted: dict[str, Submitted] = field(default_factory=dict)
    maybe_tokens: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    refused_tokens: set[str] = field(default_factory=set)
    deliveries: list[Delivery] = field(default_factory=list)
    streams_followed: set[str] = field(default_factory=set)  # /stream read until terminal
    submit_ms: dict[str, list[float]] = field(default_factory=dict)  # phase -> accepted submits' latency
    runsync_ms: dict[str, list[float]] = field(default_factory=dict)  # phase -> runsync answered COMPLETED
    ops: Counter[str] = field(default_factory=Counter)
    _seq: int = 0
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._stop = asyncio.Event()

    async def run_for(self, duration_s: float, phase: str) -> None:
        """Start operations at the configured pace for `duration_s` (they may still be in flight)."""
        self.phase = phase
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limits = httpx.Limits(max_connections=self.max_in_flight * 2, max_keepalive_connections=16)
        if not hasattr(self, "http"):
            self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(15.0, connect=2.0),
                                          limits=limits)
        deadline = time.monotonic() + duration_s
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.expovariate(self.rate_per_s))
            if len(self._tasks) >= self.max_in_flight:
                self.ops["skipped_busy"] += 1
                continue
            kind = self.rng.choices(kinds, weights)[0]
            self._seq += 1
            token = f"{phase}-{self._seq}-{self.rng.getrandbits(32):08x}"
            task = asyncio.create_task(self._operation(kind, token, phase, self.rng.random()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def finish(self, timeout_s: float = 30.0) -> None:
        """Stop polling and wait (bounded) for the operations in flight."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if hasattr(self, "http"):
            await self.http.aclose()

    # -- operations ---------------------------------------------------------------------------

    async def _operation(self, kind: str, token: str, phase: str, r: float) -> None:
        self.ops[kind] += 1
        try:
            if kind == "run":
                job_id = await self._submit(kind, "echo", "run", {"token": token, "sleep": 0.2 + r}, phase)
                if job_id:
                    await self._follow_status("echo", job_id)
            elif kind == "runsync":
                await self._submit(kind, "echo", "runsync", {"token": token, "sleep": 0.1 + r / 2}, phase)
            elif kind == "stream":
                data = {"token": token, "stream": 3, "sleep": 0.2}
                job_id = await self._submit(kind, "stream", "run", data, phase)
                if job_id:
                    await self._follow_stream(job_id)
            else:
                job_id = await self._submit(kind, "echo", "run", {"token": token, "sleep": 2 + r * 2}, phase)
                if job_id:
                    await asyncio.sleep(r * 2)
                    await self._cancel(job_id)
        except Exception as exc:  # a bug in the load itself must not pass silently
            self.ops[f"error:{type(exc).__name__}"] += 1

    def _gateways(self) -> list[str]:
        first = self.rng.randrange(len(self.gateway_urls))
        return self.gateway_urls[first:] + self.gateway_urls[:first]

    async def _submit(self, kind: str, endpoint: str, route: str, data: dict, phase: str) -> str | None:
        ep, token = self.endpoints[endpoint], data["token"]
        gateways = self._gateways()
        for attempt in range(SUBMIT_TRIES):
            base = gateways[attempt % len(gateways)]
            started = time.monotonic()
            try:
                resp = await self.http.post(f"{base}/v2/{ep}/{route}", json={"input": data})
            except httpx.TransportError:
                self.maybe_tokens.add(token)
                await asyncio.sleep(0.2)
                continue
            elapsed_ms = (time.monotonic() - started) * 1000
            if resp.status_code != 200:
                self.refused[f"{route} {resp.status_code}"] += 1
                self.refused_tokens.add(token)
                return None
            body = resp.json()
            job_id = body["id"]
            self.accepted[job_id] = Submitted(job_id=job_id, token=token, kind=kind, endpoint_id=ep,
                                              phase=phase)
            self.submit_ms.setdefault(phase, []).append(elapsed_ms)
            if route == "runsync" and body.get("status") == "COMPLETED":
                self.runsync_ms.setdefault(phase, []).append(elapsed_ms)
            if "output" in body:
                self.deliveries.append(Delivery(job_id=job_id, where=route, output=body["output"]))
            return job_id
        self.refused[f"{route} no answer"] += 1
        return None

    async def _get(self, path: str) -> dict | None:
        for base in self._gateways():
            try:
                resp = await self.http.get(f"{base}{path}")
            except httpx.TransportError:
                continue
            return resp.json() if resp.status_code == 200 else None
        return None

    async def _follow_status(self, endpoint: str, job_id: str) -> None:
        ep = self.endpoints[endpoint]
        while not self._stop.is_set():
            await asyncio.sleep(STATUS_POLL_S)
            body = await self._get(f"/v2/{ep}/status/{job_id}")
            if body is None:
                continue
            if "output" in body and body.get("status") == "COMPLETED":
                self.deliveries.append(Delivery(job_id=job_id, where="status", output=body["output"]))
            if body.get("status") in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                return

    async def _follow_stream(self, job_id: str) -> None:
        ep = self.endpoints["stream"]
        while not self._stop.is_set():
            await asyncio.sleep(STATUS_POLL_S)
            body = await self._get(f"/v2/{ep}/stream/{job_id}")
            if body is None:
                continue
            for chunk in body.get("stream") or []:
                self.deliveries.append(Delivery(job_id=job_id, where="stream", output=chunk.get("output")))
            if body.get("status") in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                self.streams_followed.add(job_id)
                return

    async def _cancel(self, job_id: str) -> None:
        ep = self.endpoints["echo"]
        self.accepted[job_id].cancel_requested = True
        for base in self._gateways():
            try:
                resp = await self.http.post(f"{base}/v2/{ep}/cancel/{job_id}")
            except httpx.TransportError:
                continue
            self.ops[f"cancel {resp.status_code}"] += 1
            return
        self.ops["cancel no answer"] += 1


def decode_output(raw: bytes | None) -> object:
    return None if raw is None else json.loads(raw)
