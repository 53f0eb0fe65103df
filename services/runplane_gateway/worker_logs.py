"""Worker logs of an endpoint (`/v1/endpoints/{id}/logs`): each live node agent is asked for
the lines it keeps (`rp.node.<node>.logs`), the answers merged by time.

The cursor is, per node, the agent's boot id and the last sequence number returned, so a
client that follows (`?after=<cursor>`) gets each line once, and everything of an agent
that restarted meanwhile."""

from __future__ import annotations

import asyncio
import base64

import msgspec
import structlog

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.codec import Codec
from runplane_proto.logs import WorkerLogsReply, WorkerLogsRequest
from runplane_gateway.errors import ApiError
from runplane_gateway.fleet import live_nodes
from runplane_gateway.wire import LogLineView, LogsView

log = structlog.get_logger("runplane.gateway.logs")

REPLY_TIMEOUT_S = 2.0
MAX_LIMIT = 1000
# How many agents are asked at once.
CONCURRENCY = 64

_REPLIES: Codec[WorkerLogsReply] = Codec(WorkerLogsReply)
Cursor = dict[str, tuple[str, int]]  # node id -> (boot id, last sequence number)
_cursor_json = msgspec.json.Decoder(dict[str, tuple[str, int]])


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(raw: str | None) -> Cursor:
    if not raw:
        return {}
    try:
        return _cursor_json.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise ApiError(400, "after: not a cursor returned by this API") from None


async def endpoint_logs(bus: Bus, endpoint_id: str, *, worker_id: str | None, after: Cursor, limit: int,
                        now_ms: int, node_loss_timeout_s: float) -> LogsView:
    nodes = await live_nodes(bus, now_ms=now_ms, node_loss_timeout_s=node_loss_timeout_s)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def ask(node_id: str) -> WorkerLogsReply | None:
        boot_id, after_seq = after.get(node_id, ("", 0))
        request = WorkerLogsRequest(endpoint_id=endpoint_id, worker_id=worker_id, boot_id=boot_id,
                                    after_seq=after_seq, limit=limit)
        async with gate:
            try:
                return await bus.request(subjects.node_logs(node_id), request, _REPLIES, REPLY_TIMEOUT_S)
            except Exception as exc:
                log.info("no worker logs from a node", node_id=node_id, error=repr(exc))
                return None

    node_ids = sorted(node.node_id for node in nodes)
    replies = await asyncio.gather(*(ask(node_id) for node_id in node_ids))
    lines: list[LogLineView] = []
    cursor: Cursor = dict(after)
    unreachable = []
    for node_id, reply in zip(node_ids, replies):
        if reply is None:
            unreachable.append(node_id)
            continue
        cursor[node_id] = (reply.boot_id, reply.last_seq)
        lines += [LogLineView(atMs=line.at_ms, nodeId=node_id, workerId=line.worker_id, stream=line.stream,
                              line=line.line, jobId=line.job_id) for line in reply.lines]
    lines.sort(key=lambda line: line.atMs)
    return LogsView(lines=lines[-limit:] if limit else [], cursor=encode_cursor(cursor),
                    unreachable=unreachable)
