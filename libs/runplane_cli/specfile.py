"""An endpoint spec from a TOML / YAML / JSON file and command-line flags (flags win).
Field names are the management API's (RunPod's): name, imageName, command, env, workersMin, ..."""

from __future__ import annotations

import argparse
import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

from runplane_cli.client import CliError

# flag dest -> API field
FLAG_FIELDS = {
    "name": "name", "image": "imageName", "workers_min": "workersMin", "workers_max": "workersMax",
    "idle_timeout": "idleTimeout", "scaler_type": "scalerType", "scaler_value": "scalerValue",
    "flashboot": "flashboot", "gpu_count": "gpuCount", "execution_timeout_ms": "executionTimeoutMs",
}


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", type=Path, help="spec file (.toml, .yaml, .yml or .json)")
    parser.add_argument("--name")
    parser.add_argument("--image", help="container image (imageName)")
    parser.add_argument("--command", help="the worker's command line, e.g. 'python handler.py'")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--workers-min", type=int)
    parser.add_argument("--workers-max", type=int)
    parser.add_argument("--idle-timeout", type=int, help="seconds")
    parser.add_argument("--scaler-type", choices=["QUEUE_DELAY", "REQUEST_COUNT"])
    parser.add_argument("--scaler-value", type=int)
    parser.add_argument("--flashboot", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--gpu-count", type=int)
    parser.add_argument("--gpu-type", action="append", default=[], metavar="TYPE",
                        help="acceptable GPU type, in order of preference (repeatable), e.g. H100")
    parser.add_argument("--execution-timeout-ms", type=int)


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text.decode())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise CliError(f"{path}: use a .toml, .yaml, .yml or .json file")
    except Exception as exc:  # TOMLDecodeError, JSONDecodeError, YAMLError, UnicodeDecodeError
        if isinstance(exc, CliError):
            raise
        raise CliError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a table / mapping of endpoint fields")
    if isinstance(data.get("command"), str):
        data["command"] = shlex.split(data["command"])
    return data


def spec_from(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given: from the file, then the flags."""
    spec = load_file(args.file) if args.file else {}
    for dest, field in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            spec[field] = value
    if args.command is not None:
        spec["command"] = shlex.split(args.command)
    if args.env:
        env = dict(spec.get("env") or {})
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CliError(f"--env {item!r}: use KEY=VALUE")
            env[key] = value
        spec["env"] = env
    if args.gpu_type:
        spec["gpuTypeIds"] = list(args.gpu_type)
    return spec
