"""Drain-on-read of a job's stream chunks: each chunk is returned by /stream once.

Chunks are `StreamChunk` messages on stream JOBCHUNKS, subject `rp.job.<job>.chunks`.
The stream sequence of the last chunk returned is kept per job in KV
`rp-stream-cursors` and moved with compare-and-set, so concurrent readers (on any
replica) never return the same chunk twice.
"""

from __future__ import annotations

import msgspec
import structlog
from msgspec import Raw
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.codec import Codec, DecodeError
from runplane_proto.jobs import StreamChunk
from runplane_gateway import metrics

log = structlog.get_logger("runplane.gateway.chunks")

_chunk_codec: Codec[StreamChunk] = Codec(StreamChunk)
_json_codec = msgspec.json.Decoder(Raw)
# Bound on one read; a bigger backlog is returned by the next read.
MAX_CHUNKS_PER_READ = 1000
CAS_ATTEMPTS = 20


class ChunkReader:
    def __init__(self, bus: Bus, cursors: KeyValue) -> None:
        self.bus = bus
        self.cursors = cursors

    @classmethod
    async def open(cls, bus: Bus) -> ChunkReader:
        return cls(bus, await bus.kv(subjects.KV_CURSORS))

    async def drain(self, job_id: str) -> list[Raw]:
        """The chunks of `job_id` not returned before (each its raw `chunk_json`)."""
        subject = subjects.job_chunks(job_id)
        for _ in range(CAS_ATTEMPTS):
            cursor, revision = await self._cursor(job_id)
            chunks, last_seq = await self._after(job_id, subject, cursor)
            if last_seq == cursor:
                return []
            if await self._move(job_id, last_seq, revision):
                metrics.STREAM_CHUNKS.inc(len(chunks))
                return chunks
            # Another reader took these chunks first: look again from its cursor.
        raise RuntimeError(f"stream cursor of job {job_id} kept changing")

    async def _cursor(self, job_id: str) -> tuple[int, int | None]:
        try:
            entry = await self.cursors.get(job_id)
        except (KeyNotFoundError, KeyDeletedError):
            return 0, None
        if entry.value is None:
            return 0, None
        try:
            return int(entry.value), entry.revision
        except ValueError:
            log.warning("bad stream cursor; starting over", job_id=job_id)
            return 0, entry.revision

    async def _after(self, job_id: str, subject: str, cursor: int) -> tuple[list[Raw], int]:
        chunks: list[Raw] = []
        seq = cursor
        while len(chunks) < MAX_CHUNKS_PER_READ:
            try:
                msg = await self.bus.js.get_msg(subjects.STREAM_CHUNKS, seq=seq + 1, subject=subject,
                                                next=True)
            except NotFoundError:
                break
            if msg.seq is None or msg.seq <= seq:
                break
            seq = msg.seq
            try:
                chunk = _chunk_codec.decode(msg.data or b"")
                # Spliced into the answer as is: it must be JSON, and this job's.
                _json_codec.decode(chunk.chunk_json)
                if chunk.job_id != job_id:
                    raise ValueError(f"a chunk of job {chunk.job_id}")
            except (*DecodeError, ValueError) as exc:
                metrics.DROPPED.labels(subjects.ALL_JOB_CHUNKS).inc()
                log.warning("dropped undecodable chunk", subject=subject, seq=seq, error=str(exc)[:200])
                continue
            chunks.append(Raw(chunk.chunk_json))
        return chunks, seq

    async def _move(self, job_id: str, seq: int, revision: int | None) -> bool:
        value = str(seq).encode()
        try:
            if revision is None:
                await self.cursors.create(job_id, value)
            else:
                await self.cursors.update(job_id, value, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True
