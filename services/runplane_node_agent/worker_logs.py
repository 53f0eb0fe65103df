"""The last lines each worker printed, kept in memory, and the answer to
`rp.node.<node>.logs` (what `runplane logs` and the gateway's `/v1/endpoints/<id>/logs` read).

Bounded: `LINES_PER_WORKER` lines of at most `LINE_CHARS` characters per worker, and the
lines of at most `WORKERS_KEPT` workers (those that printed last; a worker that exited
keeps its lines until then, so a crash can still be read).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque

import structlog
from nats.aio.msg import Msg
from runplane_bus import Bus
from runplane_proto import subjects as s
from runplane_proto.codec import Codec, encode
from runplane_proto.logs import WorkerLogLine, WorkerLogsReply, WorkerLogsRequest
from runplane_service.clock import Clock

log = structlog.get_logger("runplane.node_agent.logs")

LINES_PER_WORKER = 500
LINE_CHARS = 2000
WORKERS_KEPT = 64
MAX_LINES_PER_REPLY = 1000

_REQUESTS: Codec[WorkerLogsRequest] = Codec(WorkerLogsRequest)


class WorkerLogs:
    def __init__(self, node_id: str, clock: Clock) -> None:
        self.node_id = node_id
        self.clock = clock
        self.boot_id = secrets.token_hex(6)
        self.seq = 0
        self._lines: OrderedDict[str, deque[WorkerLogLine]] = OrderedDict()

    def record(self, worker_id: str, endpoint_id: str, stream: str, line: str, job_id: str | None) -> None:
        self.seq += 1
        kept = self._lines.get(worker_id)
        if kept is None:
            kept = self._lines[worker_id] = deque(maxlen=LINES_PER_WORKER)
            while len(self._lines) > WORKERS_KEPT:
                self._lines.popitem(last=False)
        else:
            self._lines.move_to_end(worker_id)
        kept.append(WorkerLogLine(
            seq=self.seq, at_ms=self.clock.now_ms(), worker_id=worker_id, endpoint_id=endpoint_id,
            stream=stream, line=line[:LINE_CHARS], job_id=job_id if isinstance(job_id, str) else None,
        ))

    def lines(self, request: WorkerLogsRequest) -> WorkerLogsReply:
        after = request.after_seq if request.boot_id == self.boot_id else 0
        found = [line for worker_id, kept in self._lines.items()
                 if request.worker_id in (None, worker_id)
                 for line in kept if line.endpoint_id == request.endpoint_id and line.seq > after]
        found.sort(key=lambda line: line.seq)
        limit = max(0, min(request.limit, MAX_LINES_PER_REPLY))
        return WorkerLogsReply(node_id=self.node_id, boot_id=self.boot_id,
                               lines=found[-limit:] if limit else [], last_seq=self.seq)

    async def serve(self, bus: Bus) -> None:
        async def answer(request: WorkerLogsRequest, msg: Msg) -> None:
            if msg.reply:
                await msg.respond(encode(self.lines(request)))

        await bus.subscribe(s.node_logs(self.node_id), _REQUESTS, answer)
