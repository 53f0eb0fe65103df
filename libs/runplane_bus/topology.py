"""Streams, buckets and the object store, created idempotently by every service at start."""

from __future__ import annotations

import nats.js.api as api
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from runplane_proto import subjects as s

DAY_S = 86_400.0
# Longest job TTL RunPod allows is 7 days; keep queue messages a little longer so
# the TTL check, not the stream, is what ends them.
JOBS_MAX_AGE_S = 7 * DAY_S + 3600
# The window /health's completed / failed / retried counts cover: RunPod's result retention
# for /run jobs.
JOB_ENDS_MAX_AGE_S = 1800.0
# Every write of a job record goes out again on a core subject: /runsync hears its job's end
# from the store itself (subjects.gateway_job_records).
JOB_RECORDS_REPUBLISH = api.RePublish(src=s.JOB_RECORDS_REPUBLISH_SOURCE, dest=s.JOB_RECORDS_REPUBLISH_DEST)


async def ensure_topology(js: JetStreamContext, *, replicas: int = 1) -> None:
    await _stream(js, api.StreamConfig(
        name=s.STREAM_JOBS, subjects=[s.ALL_JOB_QUEUES], retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE, max_age=JOBS_MAX_AGE_S, duplicate_window=120.0, num_replicas=replicas,
        # Direct gets count a queued job's place in one request (gateway, /status).
        allow_direct=True,
    ))
    await _stream(js, api.StreamConfig(
        name=s.STREAM_CHUNKS, subjects=[s.ALL_JOB_CHUNKS], retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE, max_age=DAY_S, num_replicas=replicas,
    ))
    await _stream(js, api.StreamConfig(
        name=s.STREAM_WEBHOOKS, subjects=[s.ALL_WEBHOOKS], retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE, max_age=DAY_S, duplicate_window=120.0, num_replicas=replicas,
    ))
    await _stream(js, api.StreamConfig(
        name=s.STREAM_JOB_ENDS, subjects=[s.ALL_JOB_ENDS], retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE, max_age=JOB_ENDS_MAX_AGE_S, duplicate_window=120.0,
        num_replicas=replicas, allow_direct=True,  # the recent completion rate, one request (/status)
    ))
    for bucket, history, ttl in (
        (s.KV_JOBS, 1, None),
        (s.KV_ENDPOINTS, 5, None),
        (s.KV_NODES, 1, None),
        (s.KV_SCALE, 1, None),
        (s.KV_PLACEMENT, 1, None),
        (s.KV_LEASES, 1, None),
        (s.KV_CURSORS, 1, DAY_S),
        (s.KV_API_KEYS, 1, None),
        # Entries carry their own TTL (dead-letter retention, idempotency window).
        (s.KV_DEAD_LETTERS, 1, None),
        (s.KV_IDEMPOTENCY, 1, None),
    ):
        await _bucket(js, api.KeyValueConfig(
            bucket=bucket, history=history, ttl=ttl, direct=True, replicas=replicas,
            republish=JOB_RECORDS_REPUBLISH if bucket == s.KV_JOBS else None,
        ))
    try:
        await js.object_store(s.OBJ_PAYLOADS)
    except Exception:
        await js.create_object_store(s.OBJ_PAYLOADS, config=api.ObjectStoreConfig(
            bucket=s.OBJ_PAYLOADS, ttl=JOBS_MAX_AGE_S, replicas=replicas,
        ))


async def ensure_job_records_republish(js: JetStreamContext) -> bool:
    """Give KV rp-jobs its republish when it was made without one (by a version before it);
    True when the stream was changed. The gateway calls this at start, as /runsync relies on it."""
    stream = f"KV_{s.KV_JOBS}"
    config = (await js.stream_info(stream)).config
    current = config.republish
    if current is not None and (current.src, current.dest) == (JOB_RECORDS_REPUBLISH.src,
                                                                JOB_RECORDS_REPUBLISH.dest):
        return False
    config.republish = JOB_RECORDS_REPUBLISH
    await js.update_stream(config)
    return True


async def _stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (e.g. created by an older version): keep it.
        await js.stream_info(config.name)


async def _bucket(js: JetStreamContext, config: api.KeyValueConfig) -> None:
    try:
        await js.key_value(config.bucket)
    except Exception:
        try:
            await js.create_key_value(config)
        except BadRequestError:
            await js.key_value(config.bucket)


async def ensure_job_consumer(js: JetStreamContext, endpoint_id: str, *, ack_wait_s: float = 30.0) -> None:
    """Make sure the endpoint's shared durable pull consumer exists and takes both its queues.

    Created only when missing, so services with different `ack_wait_s` settings never
    fight over its config; the first creator's settings win. A consumer made by an older
    version (one filter, `rp.jobs.<endpoint>`) is updated in place to take the low-priority
    queue too, keeping its position and every other setting. (Recreating it would redeliver
    the jobs in flight at once.)
    """
    durable = s.job_consumer(endpoint_id)
    try:
        info = await js.consumer_info(s.STREAM_JOBS, durable)
    except NotFoundError:
        info = None
    if info is None:
        try:
            await js.add_consumer(s.STREAM_JOBS, api.ConsumerConfig(
                durable_name=durable, filter_subjects=s.job_queues(endpoint_id),
                ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait_s, max_deliver=-1,
                max_ack_pending=-1, deliver_policy=api.DeliverPolicy.ALL,
            ))
            return
        except BadRequestError:  # created meanwhile by another service, perhaps an older one
            info = await js.consumer_info(s.STREAM_JOBS, durable)
    if job_consumer_outdated(info.config, endpoint_id):
        await js.add_consumer(s.STREAM_JOBS, info.config.evolve(
            filter_subject=None, filter_subjects=s.job_queues(endpoint_id)))


def job_consumer_outdated(config: api.ConsumerConfig, endpoint_id: str) -> bool:
    """Whether the endpoint's consumer lacks one of the endpoint's queues in its filters."""
    filters = set(config.filter_subjects or ())
    if config.filter_subject:
        filters.add(config.filter_subject)
    return not set(s.job_queues(endpoint_id)) <= filters


async def delete_job_consumer(js: JetStreamContext, endpoint_id: str) -> None:
    try:
        await js.delete_consumer(s.STREAM_JOBS, s.job_consumer(endpoint_id))
    except NotFoundError:
        pass
