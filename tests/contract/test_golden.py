"""Bytes written by earlier versions of the contract must still decode (schema evolution:
new fields get defaults and go last). Never regenerate these files; add new ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from runplane_proto.codec import Codec
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.keys import ApiKey
from runplane_proto.jobs import JobEnded, JobEvent, JobQueued, JobRecord, StreamChunk, CancelJob, WebhookDue
from runplane_proto.nodes import CommandReply, NodeCommand, NodeStatus
from runplane_proto.leases import Lease
from runplane_proto.logs import WorkerLogsReply, WorkerLogsRequest
from runplane_proto.scaling import PlacementStatus, ScaleTarget

GOLDEN = Path(__file__).parent / "golden"
TYPES = {
    "job_record": JobRecord, "job_queued": JobQueued, "job_changed": JobEvent, "chunk_added": JobEvent,
    "stream_chunk": StreamChunk, "cancel_job": CancelJob, "webhook_due": WebhookDue,
    "endpoint_spec": EndpointSpec, "node_status": NodeStatus, "start_worker": NodeCommand,
    "stop_worker": NodeCommand, "command_reply": CommandReply, "scale_target": ScaleTarget, "lease": Lease,
    "placement_status": PlacementStatus, "worker_logs_request": WorkerLogsRequest,
    "worker_logs_reply": WorkerLogsReply, "job_ended": JobEnded, "api_key": ApiKey,
}


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.msgpack")), ids=lambda p: p.name)
def test_old_bytes_still_decode(path):
    name = path.name.split(".")[0]
    decoded = Codec(TYPES[name]).decode(path.read_bytes())
    assert decoded is not None


def test_every_golden_type_has_a_file():
    assert {p.name.split(".")[0] for p in GOLDEN.glob("*.msgpack")} == set(TYPES)
