"""`rp.node.<node>.cmd`: StartWorker / StopWorker from the scheduler, answered with CommandReply."""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from runplane_bus import Bus
from runplane_proto import subjects as s
from runplane_proto.codec import Codec, encode
from runplane_proto.jobs import CancelJob
from runplane_proto.nodes import CommandReply, NodeCommand, StartWorker, StopWorker

from runplane_node_agent import metrics
from runplane_node_agent.jobs import Jobs
from runplane_node_agent.supervisor import Supervisor

log = structlog.get_logger("runplane.node_agent.commands")

_COMMANDS: Codec[NodeCommand] = Codec(NodeCommand)
_CANCELS: Codec[CancelJob] = Codec(CancelJob)


class Commands:
    def __init__(self, bus: Bus, node_id: str, supervisor: Supervisor, jobs: Jobs) -> None:
        self.bus = bus
        self.node_id = node_id
        self.supervisor = supervisor
        self.jobs = jobs

    async def subscribe(self) -> list[Subscription]:
        return [
            await self.bus.subscribe(s.node_cmd(self.node_id), _COMMANDS, self.handle),
            await self.bus.subscribe(s.ALL_CANCELS, _CANCELS, self.cancel),
        ]

    async def handle(self, cmd: NodeCommand, msg: Msg) -> None:
        try:
            match cmd:
                case StartWorker():
                    name = "start_worker"
                    reply = await self.start(cmd)
                case StopWorker():
                    name = "stop_worker"
                    reply = await self.supervisor.stop_worker(cmd)
        except Exception as exc:  # always answer: the scheduler waits for a reply
            log.exception("command failed", worker_id=cmd.worker_id)
            reply = CommandReply(ok=False, error=f"node agent error: {exc!r}")
        metrics.COMMANDS.labels(command=name, ok=str(reply.ok).lower()).inc()
        log.info("command", command=name, worker_id=cmd.worker_id, ok=reply.ok, error=reply.error)
        if msg.reply:
            await msg.respond(encode(reply))

    async def start(self, cmd: StartWorker) -> CommandReply:
        try:  # the shared consumer must exist before the worker's first take
            await self.jobs.ensure_endpoint(cmd.spec.id)
        except Exception as exc:
            return CommandReply(ok=False, error=f"cannot prepare the endpoint's queue: {exc!r}")
        return await self.supervisor.start_worker(cmd)

    async def cancel(self, cmd: CancelJob, _: Msg) -> None:
        self.jobs.stops.cancel(cmd.job_id, cmd.reason)
