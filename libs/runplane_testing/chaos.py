"""A chaos campaign under load (issue 6): a seeded driver SIGKILLs and restarts parts of a
whole deployment (chaos_deploy) while a load generator (chaos_load) submits jobs; at the end
every accepted job is accounted for (chaos_accounting).

    result = asyncio.run(run_campaign(CampaignSettings(seed=7, chaos_s=75)))
    assert not result.report.violations
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from runplane_proto import subjects
from runplane_testing.chaos_accounting import Final, Report, account
from runplane_testing.chaos_deploy import Deployment
from runplane_testing.chaos_load import Load, decode_output
from runplane_testing.waiting import async_wait_until

WORKER = str(Path(__file__).with_name("chaos_worker.py"))
KINDS = ("gateway", "scheduler", "autoscaler", "node", "worker", "nats")


@dataclass(frozen=True)
class Kill:
    at_s: float
    kind: str
    victim: str
    down_s: float


@dataclass
class ChaosDriver:
    """Every `interval_s` (seeded random) picks a kind of victim, SIGKILLs one and restarts it
    after `down_s`: a gateway replica, the leading scheduler or autoscaler (from KV
    `rp-leases`), a node agent, a worker process of a node, or one NATS server (then waits
    until the cluster is healthy again before the next kill). One victim down at a time."""

    deployment: Deployment
    seed: int
    interval_s: tuple[float, float] = (2.0, 5.0)
    down_s: tuple[float, float] = (0.5, 3.0)
    kills: list[Kill] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed)
        started = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), rng.uniform(*self.interval_s))
                return
            except TimeoutError:
                pass
            kind = rng.choice(KINDS)
            down_s = rng.uniform(*self.down_s)
            victim = await self._victim(kind, rng)
            if victim is None:
                self.skipped[kind] += 1
                continue
            self.kills.append(Kill(round(time.monotonic() - started, 1), kind, victim, round(down_s, 2)))
            await self._kill_and_restart(kind, victim, down_s)

    async def _victim(self, kind: str, rng: random.Random) -> str | None:
        d = self.deployment
        if kind == "gateway":
            return rng.choice(sorted(n for n in d.services if n.startswith("gateway")))
        if kind in ("scheduler", "autoscaler"):
            try:
                return await asyncio.wait_for(d.leader(kind), 5)
            except Exception:
                return None
        if kind == "node":
            return rng.choice(sorted(n for n in d.services if n.startswith("node")))
        if kind == "worker":
            pids = [(node, pid) for node in sorted(n for n in d.services if n.startswith("node"))
                    for pid in d.worker_pids(node)]
            if not pids:
                return None
            node, pid = rng.choice(pids)
            return f"{node}/{pid}"
        return rng.choice(d.nats).name

    async def _kill_and_restart(self, kind: str, victim: str, down_s: float) -> None:
        d = self.deployment
        if kind == "worker":  # the scheduler replaces it; nothing to restart
            try:
                os.kill(int(victim.split("/")[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if kind == "nats":
            node = next(n for n in d.nats if n.name == victim)
            await asyncio.to_thread(node.kill)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(node.start)
            await d.wait_nats_healthy(timeout_s=90)
            return
        svc = d.services[victim]
        await asyncio.to_thread(svc.kill)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(svc.start)


@dataclass(frozen=True)
class CampaignSettings:
    seed: int = 1
    chaos_s: float = 75.0
    floor_s: float = 20.0  # the same load without chaos first (0: none)
    rate_per_s: float = 3.0
    interval_s: tuple[float, float] = (2.0, 5.0)
    down_s: tuple[float, float] = (0.5, 3.0)
    drain_timeout_s: float = 120.0
    workdir: Path | None = None


@dataclass
class CampaignResult:
    report: Report
    kills: list[Kill]
    load: Load
    workdir: Path
    drained_s: float
    logs: str = ""


async def run_campaign(settings: CampaignSettings) -> CampaignResult:
    kwargs = {"workdir": settings.workdir} if settings.workdir else {}
    deployment = Deployment(**kwargs)
    async with deployment:
        try:
            return await _campaign(deployment, settings)
        except BaseException:
            print(deployment.logs(), file=sys.stderr)
            raise


async def _campaign(d: Deployment, settings: CampaignSettings) -> CampaignResult:
    executions_path = d.workdir / "executions.log"
    endpoints = await _endpoints(d, executions_path)
    load = Load(d.gateway_urls, d.api_key, endpoints, seed=settings.seed, rate_per_s=settings.rate_per_s)
    if settings.floor_s > 0:
        await load.run_for(settings.floor_s, "floor")
    driver = ChaosDriver(d, settings.seed, interval_s=settings.interval_s, down_s=settings.down_s)
    stop = asyncio.Event()
    started_at_ms = int(time.time() * 1000)
    chaos = asyncio.create_task(driver.run(stop))
    try:
        await load.run_for(settings.chaos_s, "chaos")
    finally:
        stop.set()
        await chaos  # the victim down at this moment is restarted first
    await load.finish()
    await _everything_up(d)
    drain_started = time.monotonic()
    records = await _wait_terminal(d, endpoints, load, settings.drain_timeout_s)
    drained_s = time.monotonic() - drain_started
    _write_jobs(d.workdir / "jobs.tsv", load, records, started_at_ms)
    (d.workdir / "kills.tsv").write_text("".join(f"{k.at_s}\t{k.kind}\t{k.victim}\t{k.down_s}\n"
                                                 for k in driver.kills))
    report = account(load.accepted, load.maybe_tokens, records, _executions(executions_path), load.deliveries,
                     frozenset(load.refused_tokens), frozenset(load.streams_followed))
    return CampaignResult(report=report, kills=driver.kills, load=load, workdir=d.workdir,
                          drained_s=drained_s, logs=d.logs() if report.violations else "")


async def _endpoints(d: Deployment, executions_path: Path) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {d.api_key}"}
    specs = {
        "echo": {"name": "chaos-echo", "workersMin": 2, "workersMax": 4, "scalerType": "REQUEST_COUNT",
                 "scalerValue": 3, "env": {"CHAOS_EXECUTIONS": str(executions_path)}},
        "stream": {"name": "chaos-stream", "workersMin": 1, "workersMax": 2,
                   "env": {"CHAOS_EXECUTIONS": str(executions_path), "CHAOS_MODE": "stream"}},
    }
    found = {}
    async with httpx.AsyncClient(base_url=d.gateway_urls[0], headers=headers, timeout=30) as http:
        for name, spec in specs.items():
            resp = await http.post("/v1/endpoints", json={**spec, "command": [sys.executable, WORKER]})
            assert resp.status_code == 201, resp.text
            found[name] = resp.json()["id"]

        async def ready() -> bool:
            for ep in found.values():
                health = (await http.get(f"/v2/{ep}/health")).json()
                if health["workers"]["idle"] + health["workers"]["running"] < 1:
                    return False
            return True

        await async_wait_until(ready, timeout_s=90, interval_s=0.5, what="the chaos endpoints' workers")
    return found


async def _everything_up(d: Deployment) -> None:
    for node in d.nats:
        if not node.alive:
            await asyncio.to_thread(node.start)
    await d.wait_nats_healthy(timeout_s=90)
    for svc in d.services.values():
        if not svc.alive:
            await asyncio.to_thread(svc.start)


async def _read_records(d: Deployment, endpoints: dict[str, str]) -> dict[str, Final]:
    assert d.bus is not None
    found = {}
    for ep in endpoints.values():
        async for _, r in d.bus.jobs.items(subjects.endpoint_jobs_filter(ep)):
            data = decode_output(r.input_json) if r.input_json else None
            token = data.get("token") if isinstance(data, dict) else None
            found[r.id] = Final(job_id=r.id, token=token, status=r.status,
                                output=decode_output(r.output_json), error=r.error, attempts=r.attempts,
                                submitted_at_ms=r.submitted_at_ms, completed_at_ms=r.completed_at_ms)
    return found


async def _wait_terminal(d: Deployment, endpoints: dict[str, str], load: Load,
                         timeout_s: float) -> dict[str, Final]:
    """Every record terminal (accepted jobs and the ones accepted unheard), or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = await _read_records(d, endpoints)
        except Exception:
            records = None
        if records is not None:
            pending = [j for j in load.accepted if j not in records or records[j].status not in
                       ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")]
            pending += [r.job_id for r in records.values() if r.token in load.maybe_tokens
                        and r.status not in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")]
            if not pending or time.monotonic() > deadline:
                return records
        elif time.monotonic() > deadline:
            raise TimeoutError("job records could not be read after the chaos")
        await asyncio.sleep(1.0)


def _write_jobs(path: Path, load: Load, records: dict[str, Final], chaos_started_at_ms: int) -> None:
    """One line per job for a look afterwards: seconds since the chaos began at submit, kind,
    phase, status, attempts, submit-to-end ms, id (kills.tsv has the kills on the same clock)."""
    lines = []
    for job_id, final in sorted(records.items(), key=lambda item: item[1].submitted_at_ms):
        sub = load.accepted.get(job_id)
        ended = final.completed_at_ms - final.submitted_at_ms if final.completed_at_ms else ""
        at_s = (final.submitted_at_ms - chaos_started_at_ms) / 1000
        lines.append(f"{at_s:.1f}\t{sub.kind if sub else '?'}\t{sub.phase if sub else '?'}\t{final.status}\t"
                     f"{final.attempts}\t{ended}\t{job_id}\n")
    path.write_text("".join(lines))


def _executions(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def figures(result: CampaignResult) -> dict[str, float]:
    """The campaign's figures by name (what the test prints and the benchmark tabulates)."""
    from statistics import quantiles

    def pct(samples: list[float], p: int) -> float:
        if not samples:
            return float("nan")
        if len(samples) == 1:
            return samples[0]
        return quantiles(samples, n=100, method="inclusive")[p - 1]

    r = result.report
    out: dict[str, float] = {
        "submitted": r.submitted, "no answer (retried)": r.maybe_accepted,
        "accepted unheard": r.found_unacknowledged, "completed": r.completed,
        "cancelled": r.cancelled, "timed out": r.timed_out, "executed twice": r.executed_twice,
        "lost": len(r.lost), "wrong output": len(r.wrong_output), "no reason": len(r.no_reason),
        "unexplained executions": len(r.unexplained_executions),
        "refused but left queued": len(r.refused_left_queued),
        "streams read to the end missing chunks": len(r.streams_short),
        "cancelled before their claim": len(r.cancelled_before_claim),
    }
    for name, n in sorted(r.failed_by_cause.items()):
        out[f"failed: {name}"] = n
    for refusal, n in sorted(result.load.refused.items()):
        out[f"refused: {refusal}"] = n
    for kind, n in sorted(Counter(k.kind for k in result.kills).items()):
        out[f"kills: {kind}"] = n
    for phase, label in (("floor", "floor (no chaos)"), ("chaos", "during chaos")):
        samples = r.latency_ms.get(phase, [])
        if samples:
            out[f"{label} jobs completed"] = len(samples)
            out[f"{label} latency p50 ms"] = pct(samples, 50)
            out[f"{label} latency p99 ms"] = pct(samples, 99)
    floor_p99, chaos_p99 = out.get("floor (no chaos) latency p99 ms"), out.get("during chaos latency p99 ms")
    if floor_p99 and chaos_p99:
        out["p99 ratio chaos/floor"] = chaos_p99 / floor_p99
    out["drain s"] = result.drained_s
    return out


def table(values: dict[str, float]) -> str:
    width = max(len(k) for k in values)
    return "\n".join(f"{k.ljust(width)}  {v:,.1f}" if isinstance(v, float) else f"{k.ljust(width)}  {v}"
                     for k, v in values.items())
