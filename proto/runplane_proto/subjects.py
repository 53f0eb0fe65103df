"""Every subject, stream, consumer, bucket and key name, built here and nowhere else.

Subjects follow `rp.<domain>.<id>.<kind>`; ids are checked so that no id can inject
a dot, a wildcard or a space into a subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runplane_proto import dead_letters, endpoints, idempotency, jobs, leases, logs, nodes, scaling
from runplane_proto.ids import GATEWAY_TOKEN_LEN, check_id

# JetStream streams
STREAM_JOBS = "JOBS"
STREAM_CHUNKS = "JOBCHUNKS"
STREAM_WEBHOOKS = "WEBHOOKS"
STREAM_JOB_ENDS = "JOBENDS"

# KV buckets and the object store
KV_JOBS = "rp-jobs"
KV_ENDPOINTS = "rp-endpoints"
KV_NODES = "rp-nodes"
KV_SCALE = "rp-scale"
KV_PLACEMENT = "rp-placement"
KV_LEASES = "rp-leases"
KV_CURSORS = "rp-stream-cursors"
# API keys (hashes only), gateway only: see runplane_proto.keys.
KV_API_KEYS = "rp-api-keys"
# Failed and timed-out jobs per endpoint (per-entry TTL: the dead-letter retention).
KV_DEAD_LETTERS = "rp-dead-letters"
# Idempotency-Key → job id per endpoint (per-entry TTL: the idempotency window), gateway only.
KV_IDEMPOTENCY = "rp-idempotency"
OBJ_PAYLOADS = "rp-payloads"

# Wildcards used for stream definitions and fleet-wide subscriptions.
ALL_JOB_QUEUES = "rp.jobs.>"
# Every endpoint's normal (not low-priority) queue subject.
ALL_NORMAL_JOB_QUEUES = "rp.jobs.*"
ALL_JOB_CHUNKS = "rp.job.*.chunks"
ALL_JOB_EVENTS = "rp.job.*.events"
ALL_WEBHOOKS = "rp.webhook.*.due"
ALL_JOB_ENDS = "rp.jobends.*.*"
ALL_CANCELS = "rp.endpoint.*.cancel"
WEBHOOK_CONSUMER = "webhooks"


def job_queue(endpoint_id: str, *, low_priority: bool = False) -> str:
    """Where a job is queued: `rp.jobs.<endpoint>`, or `rp.jobs.<endpoint>.low` for a
    low-priority one, so the autoscaler can count those apart (they never scale up)."""
    queue = f"rp.jobs.{check_id(endpoint_id, 'endpoint')}"
    return f"{queue}.low" if low_priority else queue


def job_queues(endpoint_id: str) -> list[str]:
    """Both queues of an endpoint: the filters of its one consumer, so delivery stays FIFO."""
    return [job_queue(endpoint_id), job_queue(endpoint_id, low_priority=True)]


def job_consumer(endpoint_id: str) -> str:
    """The durable pull consumer every node agent shares for one endpoint's queue."""
    return f"ep-{check_id(endpoint_id, 'endpoint')}"


def job_events(job_id: str) -> str:
    return f"rp.job.{check_id(job_id, 'job')}.events"


def job_chunks(job_id: str) -> str:
    return f"rp.job.{check_id(job_id, 'job')}.chunks"


def job_cancel(endpoint_id: str) -> str:
    return f"rp.endpoint.{check_id(endpoint_id, 'endpoint')}.cancel"


def webhook_due(endpoint_id: str) -> str:
    return f"rp.webhook.{check_id(endpoint_id, 'endpoint')}.due"


def job_ended(endpoint_id: str, outcome: str) -> str:
    """Where a job's end (or retry) is counted: `rp.jobends.<endpoint>.<outcome>`."""
    return f"rp.jobends.{check_id(endpoint_id, 'endpoint')}.{check_id(outcome, 'outcome')}"


def endpoint_job_ends_filter(endpoint_id: str) -> str:
    return f"rp.jobends.{check_id(endpoint_id, 'endpoint')}.*"


def node_cmd(node_id: str) -> str:
    return f"rp.node.{check_id(node_id, 'node')}.cmd"


def node_logs(node_id: str) -> str:
    """Request/reply: a node agent's last worker log lines (`WorkerLogsRequest`)."""
    return f"rp.node.{check_id(node_id, 'node')}.logs"


def job_key(endpoint_id: str, job_id: str) -> str:
    """Key of a job in KV `rp-jobs`: endpoint first so one endpoint's jobs can be listed."""
    return f"{check_id(endpoint_id, 'endpoint')}.{check_id(job_id, 'job')}"


# KV rp-jobs republishes every write of a job record (the stored message: headers, value) to
# `rp.jobrec.<endpoint>.<job id but its last 16 characters>.<its last 16 characters>`. A
# /runsync job's id ends with its gateway replica's token (ids.new_job_id), so the replica
# hears the records of its own jobs, as the server stores them, on one subscription.
JOB_RECORDS_REPUBLISH_SOURCE = f"$KV.{KV_JOBS}.*.*"
JOB_RECORDS_REPUBLISH_DEST = ("rp.jobrec.{{wildcard(1)}}."
                              f"{{{{SplitFromRight(2,{GATEWAY_TOKEN_LEN})}}}}")


def gateway_job_records(token: str) -> str:
    """What a gateway replica subscribes to for the records of its /runsync jobs."""
    return f"rp.jobrec.*.*.{check_id(token, 'gateway')}"


def endpoint_jobs_filter(endpoint_id: str) -> str:
    return f"{check_id(endpoint_id, 'endpoint')}.*"


def dead_letter_key(endpoint_id: str, job_id: str) -> str:
    """Key of a dead letter in KV `rp-dead-letters`: endpoint first, as for job records."""
    return f"{check_id(endpoint_id, 'endpoint')}.{check_id(job_id, 'job')}"


def endpoint_dead_letters_filter(endpoint_id: str) -> str:
    return f"{check_id(endpoint_id, 'endpoint')}.*"


def idempotency_key(endpoint_id: str, digest: str) -> str:
    """Key of an Idempotency-Key's entry in KV `rp-idempotency` (`digest`: hex SHA-256)."""
    return f"{check_id(endpoint_id, 'endpoint')}.{check_id(digest, 'idempotency digest')}"


def endpoint_key(endpoint_id: str) -> str:
    return check_id(endpoint_id, "endpoint")


def node_key(node_id: str) -> str:
    return check_id(node_id, "node")


def scale_key(endpoint_id: str) -> str:
    return check_id(endpoint_id, "endpoint")


def placement_key(endpoint_id: str) -> str:
    return check_id(endpoint_id, "endpoint")


def lease_key(role: str) -> str:
    return check_id(role, "lease")


def api_key_key(key_id: str) -> str:
    return check_id(key_id, "API key")


def payload_object(job_id: str, kind: str) -> str:
    """Object-store name of a large `input` or `output`."""
    return f"{check_id(job_id, 'job')}.{check_id(kind, 'payload kind')}"


@dataclass(frozen=True)
class Channel:
    """One entry of the bus contract, rendered into docs/contract.md."""

    name: str
    pattern: str
    kind: str  # "jetstream", "core", "request", "kv", "object"
    payload: Any
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    description: str


REGISTRY: tuple[Channel, ...] = (
    Channel("job queue", "rp.jobs.<endpoint>", f"jetstream {STREAM_JOBS} (work queue)", jobs.JobQueued,
            ("gateway",), ("node-agent", "autoscaler (consumer and stream info only)"),
            "One message per accepted job; acked only when the job is terminal. Durable pull consumer "
            "`ep-<endpoint>` (filters `rp.jobs.<endpoint>` and `rp.jobs.<endpoint>.low`) shared by all "
            "node agents; `in_progress` while running; redelivered after `ack_wait` when an agent dies."),
    Channel("low-priority job queue", "rp.jobs.<endpoint>.low", f"jetstream {STREAM_JOBS} (work queue)",
            jobs.JobQueued, ("gateway",), ("node-agent", "autoscaler (message counts only)"),
            "A job submitted with `policy.lowPriority`: taken by the same consumer `ep-<endpoint>` "
            "(filters on both queues, one FIFO), but counted apart so it never makes the autoscaler "
            "add a worker; it runs on workers that exist for other reasons, or expires by its TTL."),
    Channel("job events", "rp.job.<job>.events", "core", jobs.JobEvent,
            ("node-agent", "gateway", "scheduler"), ("gateway",),
            "Status changes (with the record) and stream-chunk notices; what `/status?wait=` and a "
            "repeated /runsync wait on."),
    Channel("job records of /runsync", "rp.jobrec.<endpoint>.<job head>.<gateway>",
            f"republish of KV {KV_JOBS} (core)", jobs.JobRecord, ("nats-server",), ("gateway",),
            f"Every write of a job record as stored, republished by the bucket's stream (`RePublish`: "
            f"headers, and the value unless it is a delete marker) to a subject that splits the job id "
            f"{GATEWAY_TOKEN_LEN} characters from its end. A /runsync job's id ends with the token of "
            f"the gateway replica waiting for it, which subscribes to `rp.jobrec.*.*.<token>`: the end "
            f"reaches it straight from the store, whoever wrote it, with no subscription per request."),
    Channel("job chunks", "rp.job.<job>.chunks", f"jetstream {STREAM_CHUNKS} (limits)", jobs.StreamChunk,
            ("node-agent",), ("gateway",), "Generator outputs, read by /stream with a drain cursor."),
    Channel("job cancel", "rp.endpoint.<endpoint>.cancel", "core", jobs.CancelJob,
            ("gateway", "scheduler"), ("node-agent",),
            "A job was cancelled or cut; the agent holding it offers it on the worker's stop channel."),
    Channel("webhook due", "rp.webhook.<endpoint>.due", f"jetstream {STREAM_WEBHOOKS} (work queue)",
            jobs.WebhookDue, ("node-agent", "gateway", "scheduler"), ("gateway",),
            "A job with a webhook became terminal; one gateway replica delivers it."),
    Channel("job ends", "rp.jobends.<endpoint>.<outcome>", f"jetstream {STREAM_JOB_ENDS} (limits, 30 min)",
            jobs.JobEnded, ("node-agent", "gateway", "scheduler"), ("gateway (per-subject counts only)",),
            "One message per job that ended COMPLETED (`completed`) or FAILED / TIMED_OUT (`failed`), "
            "and per /retry (`retried`), deduplicated by `Nats-Msg-Id`. Never consumed: /health reads "
            "the stream's message count per subject of the endpoint, so its counts cost one request "
            "however many jobs there are."),
    Channel("node commands", "rp.node.<node>.cmd", "request/reply", nodes.NodeCommand,
            ("scheduler",), ("node-agent",), "Start or stop a worker; answered with CommandReply."),
    Channel("worker logs", "rp.node.<node>.logs", "request/reply", logs.WorkerLogsRequest,
            ("gateway",), ("node-agent",),
            "The last lines an agent's workers printed (kept in memory per worker, a few hundred "
            "each); answered with WorkerLogsReply. What `runplane logs` and `/v1/endpoints/<id>/logs` "
            "read; lines printed while no agent kept them are not there."),
    Channel("job records", f"KV {KV_JOBS}: <endpoint>.<job>", "kv", jobs.JobRecord,
            ("gateway", "node-agent", "scheduler"), ("gateway", "node-agent", "scheduler"),
            "The job's state; compare-and-set writes."),
    Channel("dead letters", f"KV {KV_DEAD_LETTERS}: <endpoint>.<job>", "kv", dead_letters.DeadLetter,
            ("node-agent", "gateway", "scheduler"), ("gateway",),
            "A job that ended FAILED or TIMED_OUT: input, final error, every attempt (worker, node, "
            "error). Written by whoever wrote the terminal record, right after it, with a per-entry "
            "TTL (`RP_DEAD_LETTER_RETENTION_S`); listed, replayed and deleted by the gateway "
            "(`/v1/endpoints/<id>/dead-letters`)."),
    Channel("idempotent submits", f"KV {KV_IDEMPOTENCY}: <endpoint>.<digest>", "kv",
            idempotency.IdempotentSubmit, ("gateway",), ("gateway",),
            "Which job an `Idempotency-Key` made (digest of API key id and client key). Created with "
            "KV `create`, so of two replicas racing on one key the server lets exactly one win; "
            "per-entry TTL `RP_IDEMPOTENCY_WINDOW_S`."),
    Channel("endpoint specs", f"KV {KV_ENDPOINTS}: <endpoint>", "kv", endpoints.EndpointSpec,
            ("gateway",), ("scheduler", "autoscaler", "node-agent"), "Endpoint configuration."),
    Channel("node status", f"KV {KV_NODES}: <node>", "kv", nodes.NodeStatus,
            ("node-agent",), ("scheduler", "autoscaler", "gateway"),
            "Inventory, workers and heartbeat time; a node whose heartbeat is older than the "
            "loss timeout is lost."),
    Channel("leader leases", f"KV {KV_LEASES}: <role>", "kv", leases.Lease,
            ("scheduler", "autoscaler"), ("scheduler", "autoscaler"),
            "Who is the active scheduler / autoscaler; renewed with compare-and-set, taken over "
            "by a standby once expired."),
    Channel("scale targets", f"KV {KV_SCALE}: <endpoint>", "kv", scaling.ScaleTarget,
            ("autoscaler",), ("scheduler",), "Desired worker count per endpoint."),
    Channel("placement status", f"KV {KV_PLACEMENT}: <endpoint>", "kv", scaling.PlacementStatus,
            ("scheduler",), ("gateway", "autoscaler"),
            "Wanted workers that no node can take now and why (shown by /health as `throttled`); "
            "deleted once they are placed."),
)
