"""Render docs/contract.md from the registry: `python -m runplane_proto.contract > docs/contract.md`."""

from __future__ import annotations

import json
import sys

import msgspec

from runplane_proto.subjects import REGISTRY


def render() -> str:
    lines = [
        "# Bus contract",
        "",
        "Generated from `proto/runplane_proto` by `python -m runplane_proto.contract`; do not edit.",
        "Every payload is msgpack-encoded; the schemas below are the JSON Schema of the same Structs.",
        "",
        "| channel | subject / key | kind | payload | publishers | subscribers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ch in REGISTRY:
        name = getattr(ch.payload, "__name__", None) or " \\| ".join(
            t.__name__ for t in ch.payload.__args__
        )
        lines.append(
            f"| {ch.name} | `{ch.pattern}` | {ch.kind} | `{name}` | {', '.join(ch.publishers)} "
            f"| {', '.join(ch.subscribers)} |"
        )
    lines.append("")
    for ch in REGISTRY:
        lines += [f"## {ch.name}", "", ch.description, "", "```json"]
        lines.append(json.dumps(msgspec.json.schema(ch.payload), indent=1, sort_keys=True))
        lines += ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
