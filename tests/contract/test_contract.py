"""The bus contract: documented, stable, and built in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgspec
import pytest

from runplane_proto import subjects
from runplane_proto.codec import Codec, encode
from runplane_proto.contract import render
from runplane_proto.jobs import JobEvent, JobChanged, JobPolicy, JobRecord
from runplane_proto.nodes import NodeCommand, StartWorker
from runplane_proto.endpoints import EndpointSpec

ROOT = Path(__file__).resolve().parents[2]


def test_contract_document_is_current():
    assert (ROOT / "docs" / "contract.md").read_text() == render(), (
        "docs/contract.md is stale: run `.venv/bin/python -m runplane_proto.contract > docs/contract.md`"
    )


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "a b", "", "a/b", "x" * 129])
def test_subject_builders_reject_ids_that_would_break_subjects(bad):
    with pytest.raises(ValueError):
        subjects.job_queue(bad)
    with pytest.raises(ValueError):
        subjects.job_events(bad)


def test_subjects_have_the_documented_shape():
    assert subjects.job_queue("ep1") == "rp.jobs.ep1"
    assert subjects.job_events("j-1") == "rp.job.j-1.events"
    assert subjects.node_cmd("n1") == "rp.node.n1.cmd"
    assert subjects.job_key("ep1", "j1") == "ep1.j1"


def test_no_subject_literals_outside_proto():
    """Subjects are built by functions in proto/runplane_proto/subjects.py, never inline."""
    pattern = re.compile(r"""["']rp\.[a-z]+\.""")
    offenders = []
    for base in ("libs", "services"):
        for path in (ROOT / base).rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert offenders == []


def test_services_never_import_each_other():
    services = {p.name for p in (ROOT / "services").iterdir() if p.is_dir() and p.name.startswith("runplane_")}
    offenders = []
    for svc in services:
        for path in (ROOT / "services" / svc).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in services and top != svc:
                        offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_libs_and_proto_do_not_import_services():
    offenders = []
    for base in ("libs", "proto"):
        for path in (ROOT / base).rglob("*.py"):
            text = path.read_text()
            if re.search(r"^\s*(from|import) runplane_(gateway|scheduler|autoscaler|node_agent)\b", text, re.M):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_pure_decision_modules_do_no_io():
    forbidden = {"nats", "aiodocker", "pynvml", "asyncio", "time", "httpx", "structlog", "runplane_bus"}
    pure = [ROOT / "services/runplane_autoscaler/policy.py", ROOT / "services/runplane_scheduler/placement.py",
            ROOT / "services/runplane_scheduler/janitor_rules.py", ROOT / "services/runplane_node_agent/flash/pool.py"]
    for path in pure:
        if not path.exists():
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                tops = {node.module.split(".")[0]}
            else:
                continue
            assert not (tops & forbidden), f"{path.name} imports {tops & forbidden}"


def test_messages_round_trip_and_unknown_tags_fail_cleanly():
    record = JobRecord(id="j1", endpoint_id="ep1", status="IN_QUEUE", submitted_at_ms=5,
                       policy=JobPolicy(execution_timeout_ms=1000, ttl_ms=2000), input_json=b'{"a":1}')
    codec: Codec = Codec(JobEvent)
    assert codec.decode(encode(JobChanged(record=record))) == JobChanged(record=record)
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        codec.decode(encode({"type": "nope"}))
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        Codec(NodeCommand).decode(b"\xc1garbage")
    spec = EndpointSpec(id="ep1", name="x")
    cmd = StartWorker(worker_id="w1", spec=spec)
    assert Codec(NodeCommand).decode(encode(cmd)) == cmd


def test_bad_ids_fail_at_decode():
    bad = encode({"type": "job_changed", "record": {"id": "a.b", "endpoint_id": "e", "status": "IN_QUEUE",
                                                      "policy": {"execution_timeout_ms": 1, "ttl_ms": 1},
                                                      "submitted_at_ms": 1}})
    with pytest.raises(msgspec.ValidationError):
        Codec(JobEvent).decode(bad)
