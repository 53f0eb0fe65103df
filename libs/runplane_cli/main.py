"""`runplane`: argument parsing and one function per command.

    runplane up                                   everything on this machine (./scripts/run)
    runplane endpoint create|list|get|update|delete
    runplane job run|status|cancel|stream|list
    runplane nodes | workers ENDPOINT | logs ENDPOINT [-f]
    runplane keys create|list|get|revoke          API keys (an admin key only)

Every command but `up` talks to the gateway's HTTP API only: `RP_URL` (or --url) and
`RP_API_KEY` (or --api-key; else the key `runplane up` keeps in ./.runplane/api-key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runplane_cli import jobwatch, render
from runplane_cli.client import DEFAULT_URL, CliError, Gateway, default_api_key
from runplane_cli.specfile import add_spec_flags, spec_from

Handler = Callable[[Gateway, argparse.Namespace], int]


# -- endpoints -----------------------------------------------------------------------------------

def endpoint_create(gw: Gateway, args: argparse.Namespace) -> int:
    spec = spec_from(args)
    if "name" not in spec:
        raise CliError("an endpoint needs a name: --name or `name` in the file")
    created = gw.post("/v1/endpoints", spec)
    if args.json:
        render.print_json(created)
    else:
        render.out.print(f"created endpoint [bold]{created['id']}[/] ({created['name']})")
    return 0


def endpoint_list(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get("/v1/endpoints")
    render.print_json(found) if args.json else render.endpoints(found)
    return 0


def endpoint_get(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get(f"/v1/endpoints/{gw.endpoint_id(args.endpoint)}")
    render.print_json(found) if args.json else render.endpoint(found)
    return 0


def endpoint_update(gw: Gateway, args: argparse.Namespace) -> int:
    changes = spec_from(args)
    if not changes:
        raise CliError("nothing to change: give flags or -f FILE")
    updated = gw.call("PATCH", f"/v1/endpoints/{gw.endpoint_id(args.endpoint)}", json=changes)
    if args.json:
        render.print_json(updated)
    else:
        render.out.print(f"updated endpoint [bold]{updated['id']}[/]: {', '.join(sorted(changes))}")
    return 0


def endpoint_delete(gw: Gateway, args: argparse.Namespace) -> int:
    deleted = gw.call("DELETE", f"/v1/endpoints/{gw.endpoint_id(args.endpoint)}")
    render.print_json(deleted) if args.json else render.out.print(f"deleted endpoint {deleted['id']}")
    return 0


# -- jobs ----------------------------------------------------------------------------------------

def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.input_file is not None:
        raw = sys.stdin.read() if str(args.input_file) == "-" else args.input_file.read_text()
    else:
        raw = args.input if args.input is not None else "{}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"the input is not JSON: {exc}") from None
    body: dict[str, Any] = {"input": value}
    policy = {k: v for k, v in (("executionTimeout", args.execution_timeout_ms), ("ttl", args.ttl_ms),
                                ("lowPriority", args.low_priority or None)) if v is not None}
    if policy:
        body["policy"] = policy
    if args.webhook:
        body["webhook"] = args.webhook
    return body


def job_run(gw: Gateway, args: argparse.Namespace) -> int:
    endpoint_id = gw.endpoint_id(args.endpoint)
    body = _job_body(args)
    if args.sync:
        job = gw.post(f"/v2/{endpoint_id}/runsync", body, timeout_s=None)
    else:
        job = gw.post(f"/v2/{endpoint_id}/run", body)
    if args.no_wait:
        render.print_json(job) if args.json else print(job["id"])
        return 0
    if not args.json:
        render.err.print(f"job [bold]{job['id']}[/] {job['status']}")
    if args.stream:
        return jobwatch.stream(gw, endpoint_id, job["id"], as_json=args.json, timeout_s=args.timeout)
    if job["status"] not in jobwatch.TERMINAL:
        job = jobwatch.watch(gw, endpoint_id, job["id"], timeout_s=args.timeout)
    return jobwatch.print_result(job, as_json=args.json)


def job_status(gw: Gateway, args: argparse.Namespace) -> int:
    endpoint_id = gw.endpoint_id(args.endpoint)
    job = gw.get(f"/v2/{endpoint_id}/status/{args.job}")
    if args.wait and job["status"] not in jobwatch.TERMINAL:
        job = jobwatch.watch(gw, endpoint_id, args.job, timeout_s=args.timeout)
    render.print_json(job)
    return 0


def job_cancel(gw: Gateway, args: argparse.Namespace) -> int:
    job = gw.post(f"/v2/{gw.endpoint_id(args.endpoint)}/cancel/{args.job}")
    render.print_json(job) if args.json else print(f"{job['id']} {job['status']}")
    return 0


def job_stream(gw: Gateway, args: argparse.Namespace) -> int:
    return jobwatch.stream(gw, gw.endpoint_id(args.endpoint), args.job, as_json=args.json,
                           timeout_s=args.timeout)


def job_list(gw: Gateway, args: argparse.Namespace) -> int:
    path = f"/v1/endpoints/{gw.endpoint_id(args.endpoint)}/jobs"
    found = gw.get(path, limit=args.limit, status=args.status)
    render.print_json(found) if args.json else render.jobs(found)
    return 0


# -- fleet ---------------------------------------------------------------------------------------

def nodes(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get("/v1/nodes")
    render.print_json(found) if args.json else render.nodes(found)
    return 0


def workers(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get(f"/v1/endpoints/{gw.endpoint_id(args.endpoint)}/workers")
    render.print_json(found) if args.json else render.workers(found)
    return 0


def logs(gw: Gateway, args: argparse.Namespace) -> int:
    endpoint_id = gw.endpoint_id(args.endpoint)
    path = f"/v1/endpoints/{endpoint_id}/logs"
    got = gw.get(path, worker=args.worker, limit=args.tail)
    warned: set[str] = set()
    while True:
        for line in got["lines"]:
            print(json.dumps(line), flush=True) if args.json else render.log_line(line)
        for node_id in set(got.get("unreachable", [])) - warned:
            render.err.print(f"[yellow]node {node_id} did not answer (its lines are missing)[/]")
            warned.add(node_id)
        if not args.follow:
            return 0
        time.sleep(args.interval)
        got = gw.get(path, worker=args.worker, after=got["cursor"], limit=1000)


# -- API keys ------------------------------------------------------------------------------------

def keys_create(gw: Gateway, args: argparse.Namespace) -> int:
    if args.admin and args.endpoint:
        raise CliError("an admin key reaches every endpoint: give --admin or --endpoint, not both")
    body: dict[str, Any] = {"name": args.name, "scope": "admin" if args.admin else "endpoint"}
    if args.endpoint:
        body["endpoints"] = [gw.endpoint_id(name) for name in args.endpoint]
    made = gw.post("/v1/keys", body)
    if args.json:
        render.print_json(made)
    else:
        reach = "everything" if args.admin else ", ".join(made["endpoints"]) or "every endpoint's /v2 API"
        render.err.print(f"created API key [bold]{made['id']}[/] ({made['name']}, {reach}); "
                         "its secret, shown only now:")
        print(made["key"])
    return 0


def keys_list(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get("/v1/keys")
    render.print_json(found) if args.json else render.keys(found)
    return 0


def keys_get(gw: Gateway, args: argparse.Namespace) -> int:
    found = gw.get(f"/v1/keys/{args.key}")
    render.print_json(found) if args.json else render.keys([found])
    return 0


def keys_revoke(gw: Gateway, args: argparse.Namespace) -> int:
    revoked = gw.call("DELETE", f"/v1/keys/{args.key}")
    render.print_json(revoked) if args.json else render.out.print(f"revoked API key {revoked['id']}")
    return 0


# -- up ------------------------------------------------------------------------------------------

def up(_: argparse.Namespace) -> int:
    from runplane_service import up as local

    local.main()
    return 0


# -- wiring --------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="runplane", description="Runplane: serverless GPU endpoints.")
    root.add_argument("--url", default=os.environ.get("RP_URL", DEFAULT_URL),
                      help="the gateway (RP_URL; default %(default)s)")
    root.add_argument("--api-key", default=None, help="API key (RP_API_KEY; else ./.runplane/api-key)")
    root.add_argument("--json", action="store_true", help="print the API's JSON")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("up", help="start NATS and every service on this machine (Ctrl-C stops)") \
        .set_defaults(local=up)

    endpoint = commands.add_parser("endpoint", help="create, list, get, update, delete endpoints")
    ep_commands = endpoint.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = ep_commands.add_parser("create", help="from flags and/or a TOML/YAML/JSON file")
    add_spec_flags(create)
    create.set_defaults(run=endpoint_create)
    ep_commands.add_parser("list", help="every endpoint").set_defaults(run=endpoint_list)
    for name, run, helptext in (("get", endpoint_get, "one endpoint's spec"),
                                ("delete", endpoint_delete, "delete (its queued jobs are cancelled)")):
        cmd = ep_commands.add_parser(name, help=helptext)
        cmd.add_argument("endpoint", help="id or name")
        cmd.set_defaults(run=run)
    update = ep_commands.add_parser("update", help="change the fields given (flags and/or a file)")
    update.add_argument("endpoint", help="id or name")
    add_spec_flags(update)
    update.set_defaults(run=endpoint_update)

    job = commands.add_parser("job", help="run jobs and follow them")
    job_commands = job.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = job_commands.add_parser("run", help="submit a job, show its status live, print its output")
    run.add_argument("endpoint", help="id or name")
    run.add_argument("input", nargs="?", help="the job's input as JSON (default {})")
    run.add_argument("-i", "--input-file", type=Path, help="read the input JSON from a file (- for stdin)")
    run.add_argument("--sync", action="store_true", help="use /runsync")
    run.add_argument("--stream", action="store_true", help="print stream chunks as they come")
    run.add_argument("--no-wait", action="store_true", help="print the job id and return")
    run.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    run.add_argument("--webhook")
    run.add_argument("--execution-timeout-ms", type=int)
    run.add_argument("--ttl-ms", type=int)
    run.add_argument("--low-priority", action="store_true")
    run.set_defaults(run=job_run)
    for name, handler, helptext in (("status", job_status, "a job's status and output (JSON)"),
                                    ("cancel", job_cancel, "cancel a job"),
                                    ("stream", job_stream, "print a job's stream chunks as they come")):
        cmd = job_commands.add_parser(name, help=helptext)
        cmd.add_argument("endpoint", help="id or name")
        cmd.add_argument("job")
        cmd.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)
        if name == "status":
            cmd.add_argument("--wait", action="store_true", help="wait until the job has ended")
        cmd.set_defaults(run=handler)
    listing = job_commands.add_parser("list", help="an endpoint's recent jobs, newest first")
    listing.add_argument("endpoint", help="id or name")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--status", help="only jobs in this status, e.g. FAILED")
    listing.set_defaults(run=job_list)

    commands.add_parser("nodes", help="nodes: GPUs free/used and what runs on them").set_defaults(run=nodes)
    wk = commands.add_parser("workers", help="an endpoint's workers: state, node, GPUs")
    wk.add_argument("endpoint", help="id or name")
    wk.set_defaults(run=workers)
    lg = commands.add_parser("logs", help="what an endpoint's workers printed")
    lg.add_argument("endpoint", help="id or name")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    lg.add_argument("--worker", help="only this worker's lines")
    lg.add_argument("--tail", type=int, default=100, help="how many recent lines first (default 100)")
    lg.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    lg.set_defaults(run=logs)
    keys = commands.add_parser("keys", help="API keys: create, list, get, revoke (an admin key only)")
    key_commands = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    create_key = key_commands.add_parser("create", help="a new key; its secret is printed once")
    create_key.add_argument("name")
    create_key.add_argument("--endpoint", action="append", default=[], metavar="ENDPOINT",
                            help="id or name, repeatable: only these endpoints (default: every endpoint)")
    create_key.add_argument("--admin", action="store_true", help="an admin key (endpoints, keys, nodes)")
    create_key.set_defaults(run=keys_create)
    key_commands.add_parser("list", help="every key, without secrets").set_defaults(run=keys_list)
    for name, handler, helptext in (("get", keys_get, "one key, without its secret"),
                                    ("revoke", keys_revoke, "revoke a key (refused at once everywhere)")):
        cmd = key_commands.add_parser(name, help=helptext)
        cmd.add_argument("key", help="the key's id")
        cmd.set_defaults(run=handler)
    _json_everywhere(root)
    return root


def _json_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--json` also after the command (`runplane nodes --json`)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        for sub in action.choices.values():
            _json_everywhere(sub)
    if not subcommands and parser.prog != "runplane up":
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print the API's JSON")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "local", None) is not None:
        sys.exit(args.local(args))
    gw = Gateway(args.url, args.api_key or default_api_key())
    try:
        sys.exit(args.run(gw, args))
    except CliError as exc:
        render.err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        gw.close()


if __name__ == "__main__":
    main()
