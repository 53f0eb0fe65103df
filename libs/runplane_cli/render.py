"""Tables and values for a person (rich); `--json` prints the API's JSON instead."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# A pipe gets wide lines rather than wrapped cells.
out = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
err = Console(stderr=True, highlight=False)

STATUS_STYLES = {"COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow", "TIMED_OUT": "red",
                 "IN_PROGRESS": "cyan", "IN_QUEUE": "blue"}
STATE_STYLES = {"idle": "green", "running": "cyan", "initializing": "blue", "parked": "magenta",
                "stopping": "yellow"}


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def ago(at_ms: int | None, now_ms: int | None = None) -> str:
    if not at_ms:
        return "-"
    seconds = max(0, ((now_ms or int(time.time() * 1000)) - at_ms) // 1000)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def ms(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def styled(text: str, styles: dict[str, str]) -> str:
    style = styles.get(text)
    return f"[{style}]{text}[/]" if style else text


def endpoints(items: list[dict]) -> None:
    table = Table("ID", "NAME", "WORKERS", "GPUS", "SCALER", "FLASH", "RUNS")
    for ep in items:
        gpus = f"{ep['gpuCount']} × {'/'.join(ep['gpuTypeIds']) or 'any'}" if ep["gpuCount"] else "-"
        runs = ep.get("imageName") or " ".join(ep.get("command") or [])
        table.add_row(ep["id"], ep["name"], f"{ep['workersMin']}–{ep['workersMax']}", gpus,
                      f"{ep['scalerType']} {ep['scalerValue']}", "yes" if ep["flashboot"] else "no", runs)
    out.print(table)


def endpoint(ep: dict) -> None:
    table = Table("FIELD", "VALUE", show_header=False, box=None)
    for key in sorted(ep):
        value = ep[key]
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    out.print(table)


def keys(items: list[dict]) -> None:
    table = Table("ID", "NAME", "PREFIX", "SCOPE", "ENDPOINTS", "CREATED")
    for key in items:
        endpoints = ", ".join(key["endpoints"]) or ("all" if key["scope"] == "endpoint" else "-")
        table.add_row(key["id"], escape(key["name"]), key["prefix"] + "_…", key["scope"], endpoints,
                      ago(key["createdAtMs"]) + " ago")
    out.print(table)


def jobs(items: list[dict]) -> None:
    table = Table("JOB", "STATUS", "SUBMITTED", "DELAY", "EXECUTION", "WORKER", "NODE", "ERROR")
    for job in items:
        table.add_row(job["id"], styled(job["status"], STATUS_STYLES), ago(job["submittedAtMs"]) + " ago",
                      ms(job.get("delayTime")), ms(job.get("executionTime")), job.get("workerId") or "-",
                      job.get("nodeId") or "-", (job.get("error") or "")[:60])
    out.print(table)


def nodes(items: list[dict]) -> None:
    table = Table("NODE", "STATE", "RUNTIME", "CPUS", "MEMORY", "GPUS (USED/TOTAL)", "WORKERS", "HEARTBEAT")
    for node in items:
        state = ("[red]lost[/]" if node["lost"] else "[yellow]draining[/]" if node["draining"]
                 else "[green]up[/]")
        gpu_lines = [f"{node['gpusUsed']}/{len(node['gpus'])}"] if node["gpus"] else ["-"]
        for gpu in node["gpus"]:
            holder = f" → {gpu['endpointId']}/{gpu['workerId']}" if gpu.get("workerId") else " free"
            gpu_lines.append(f"#{gpu['index']} {gpu['name']} {gpu['utilizationPct']}% "
                             f"{gpu['memoryUsedMb']}/{gpu['memoryTotalMb']} MB{holder}")
        by_state: dict[str, int] = {}
        for worker in node["workers"]:
            by_state[worker["state"]] = by_state.get(worker["state"], 0) + 1
        workers = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "-"
        table.add_row(node["id"], state, node["runtime"], str(node["cpuCount"]),
                      f"{node['memoryTotalMb']} MB", "\n".join(gpu_lines), workers,
                      ago(node["heartbeatAtMs"]) + " ago")
    out.print(table)


def workers(items: list[dict]) -> None:
    table = Table("WORKER", "STATE", "NODE", "GPUS", "JOBS", "UP")
    for worker in items:
        gpus = ", ".join(worker["gpuNames"]) or "-"
        table.add_row(worker["id"], styled(worker["state"], STATE_STYLES), worker["nodeId"], gpus,
                      ", ".join(worker["jobs"]) or "-", ago(worker["startedAtMs"]))
    out.print(table)


def log_line(line: dict) -> None:
    at = time.strftime("%H:%M:%S", time.localtime(line["atMs"] / 1000))
    where = f"{line['nodeId']}/{line['workerId']}"
    style = "red" if line["stream"] == "stderr" else "dim"
    out.print(f"[{style}]{at} {escape(where)}[/] {escape(line['line'])}", highlight=False, soft_wrap=True)
