"""Worker logs: each node agent keeps the last lines its workers printed and answers
`rp.node.<node>.logs` (request/reply) with those of one endpoint (or one worker)."""

from __future__ import annotations

import msgspec

from runplane_proto.ids import EndpointId, NodeId, WorkerId


class WorkerLogLine(msgspec.Struct, frozen=True, kw_only=True):
    # Per agent process, increasing; with `WorkerLogsReply.boot_id` it is a cursor.
    seq: int
    at_ms: int
    worker_id: WorkerId
    endpoint_id: EndpointId
    stream: str  # "stdout" | "stderr"
    line: str
    # The job the line was printed for, when the RunPod SDK said so (`requestId`).
    job_id: str | None = None


class WorkerLogsRequest(msgspec.Struct, frozen=True, kw_only=True, tag="worker_logs_request"):
    """Lines of `endpoint_id`'s workers (only `worker_id`'s when set) newer than `after_seq`,
    the last `limit` of them. `after_seq` counts only when `boot_id` is the agent's own: a
    restarted agent starts its sequence again and answers from its first line."""

    endpoint_id: EndpointId
    worker_id: WorkerId | None = None
    boot_id: str = ""
    after_seq: int = 0
    limit: int = 200


class WorkerLogsReply(msgspec.Struct, frozen=True, kw_only=True, tag="worker_logs_reply"):
    node_id: NodeId
    # Changes each time the agent starts; names the sequence `seq` counts in.
    boot_id: str
    lines: list[WorkerLogLine] = []
    # The agent's latest sequence number (the cursor to continue from when `lines` is empty).
    last_seq: int = 0
