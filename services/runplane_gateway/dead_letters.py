"""The dead-letter API, `/v1/endpoints/{id}/dead-letters`: list (filtered by time and error
text, paged), show one with its input, replay one, a selection or all (as new jobs on the same
or another endpoint, each linked from its dead letter), delete.

Dead letters are written by whoever ends a job FAILED / TIMED_OUT (runplane_bus.Bus.add_dead_letter);
this module only reads, links and deletes them. Listing reads the endpoint's entries a page at
a time (a pull consumer of `rp-dead-letters`) and keeps only the small summaries that match."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
import structlog
from msgspec import UNSET, Raw, UnsetType
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_bus import Bus, Conflict
from runplane_proto import subjects
from runplane_proto.dead_letters import DeadLetter, DeadLetterReplay
from runplane_proto.ids import ID_PATTERN, is_valid_id, new_job_id
from runplane_service.clock import Clock
from runplane_gateway.catalog import EndpointCatalog
from runplane_gateway.errors import ApiError, json_response
from runplane_gateway.jobs import Jobs
from runplane_gateway.keys import access_in
from runplane_gateway.request_fields import decoded_body, query_int
from runplane_gateway.wire import Deleted, encoder

log = structlog.get_logger("runplane.gateway.dead_letters")

MAX_LIMIT = 1000
# `<failed at ms>_<job id>`: where a page ended.
CURSOR_PATTERN = r"^[0-9]{1,15}_[A-Za-z0-9_-]{1,128}$"
_CURSOR = re.compile(CURSOR_PATTERN)
MAX_REPLAY_BODY_BYTES = 1024 * 1024
# The most dead letters one replay request names (`all` is not bounded by this).
MAX_REPLAY_IDS = 1000

# -- wire shapes ---------------------------------------------------------------------------------


class AttemptView(msgspec.Struct, frozen=True):
    number: int
    workerId: str | None
    nodeId: str | None
    startedAtMs: int | None
    endedAtMs: int | None
    error: str | None


class ReplayView(msgspec.Struct, frozen=True):
    endpointId: str
    jobId: str
    replayedAtMs: int


class DeadLetterSummary(msgspec.Struct, frozen=True):
    """A dead letter without its input."""

    jobId: str
    endpointId: str
    status: str
    error: str | None
    submittedAtMs: int
    failedAtMs: int
    attempts: list[AttemptView]
    retries: int
    replays: list[ReplayView]


class DeadLetterView(DeadLetterSummary, frozen=True):
    """One dead letter with its input (left out when its object expired)."""

    input: Raw | UnsetType = UNSET


class DeadLetterPage(msgspec.Struct, frozen=True):
    deadLetters: list[DeadLetterSummary]
    # Pass as `after` for the next page; null on the last one.
    next: str | None = None


class DeadLettersDeleted(msgspec.Struct, frozen=True):
    deleted: int


JobIdText = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


class DeadLetterReplayRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which dead letters to replay: `jobIds`, or `all` (narrowed by the filters), and where to
    (`endpointId`, by default the dead letters' own endpoint)."""

    jobIds: Annotated[list[JobIdText], msgspec.Meta(max_length=MAX_REPLAY_IDS)] | None = None
    all: bool = False
    since: Annotated[int, msgspec.Meta(ge=0)] | None = None
    until: Annotated[int, msgspec.Meta(ge=0)] | None = None
    error: str | None = None
    endpointId: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)] | None = None


class ReplayedJob(msgspec.Struct, frozen=True):
    deadLetter: str  # the dead letter's job id
    endpointId: str
    id: str  # the new job
    status: str


class ReplaySkipped(msgspec.Struct, frozen=True):
    deadLetter: str
    reason: str


class DeadLettersReplayed(msgspec.Struct, frozen=True):
    replayed: list[ReplayedJob]
    skipped: list[ReplaySkipped]


_replay_decoder = msgspec.json.Decoder(DeadLetterReplayRequest)


# -- filters -------------------------------------------------------------------------------------


class Filter(msgspec.Struct, frozen=True):
    since_ms: int | None = None
    until_ms: int | None = None
    error: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.since_ms is not None and letter.failed_at_ms < self.since_ms:
            return False
        if self.until_ms is not None and letter.failed_at_ms >= self.until_ms:
            return False
        if self.error:
            needle = self.error.lower()
            texts = [letter.error or "", *(a.error or "" for a in letter.attempts)]
            return any(needle in text.lower() for text in texts)
        return True


def _filter(request: Request) -> Filter:
    return Filter(since_ms=_time(request, "since"), until_ms=_time(request, "until"),
                  error=request.query_params.get("error") or None)


def _time(request: Request, name: str) -> int | None:
    return query_int(request, name, default=None, meaning="a time in milliseconds since the epoch")


def _order(letter: DeadLetter | DeadLetterSummary) -> tuple[int, str]:
    """Newest first, then by job id: the list's order and its cursor."""
    if isinstance(letter, DeadLetter):
        return (-letter.failed_at_ms, letter.job_id)
    return (-letter.failedAtMs, letter.jobId)


def _cursor(summary: DeadLetterSummary) -> str:
    return f"{summary.failedAtMs}_{summary.jobId}"


def _after(raw: str | None) -> tuple[int, str] | None:
    if not raw:
        return None
    if _CURSOR.fullmatch(raw) is None:
        raise ApiError(400, f"after: not a cursor of this list: {raw[:80]!r}")
    at, _, job_id = raw.partition("_")
    return (-int(at), job_id)


def summary_of(letter: DeadLetter) -> DeadLetterSummary:
    return DeadLetterSummary(
        jobId=letter.job_id, endpointId=letter.endpoint_id, status=letter.status, error=letter.error,
        submittedAtMs=letter.submitted_at_ms, failedAtMs=letter.failed_at_ms,
        attempts=[AttemptView(number=a.number, workerId=a.worker_id, nodeId=a.node_id,
                              startedAtMs=a.started_at_ms, endedAtMs=a.ended_at_ms, error=a.error)
                  for a in letter.attempts],
        retries=letter.retries,
        replays=[ReplayView(endpointId=r.endpoint_id, jobId=r.job_id, replayedAtMs=r.replayed_at_ms)
                 for r in letter.replays],
    )


# -- the API -------------------------------------------------------------------------------------


class DeadLetterApi:
    def __init__(self, bus: Bus, catalog: EndpointCatalog, jobs: Jobs, clock: Clock) -> None:
        self.bus = bus
        self.catalog = catalog
        self.jobs = jobs
        self.clock = clock

    def routes(self) -> list[Route]:
        base = "/v1/endpoints/{endpoint_id}/dead-letters"
        return [
            Route(base, self.list, methods=["GET"]),
            Route(base, self.delete_many, methods=["DELETE"]),
            Route(base + "/replay", self.replay, methods=["POST"]),
            Route(base + "/{job_id}", self.get, methods=["GET"]),
            Route(base + "/{job_id}", self.delete_one, methods=["DELETE"]),
        ]

    async def list(self, request: Request) -> Response:
        endpoint_id = await self._endpoint(request)
        limit = query_int(request, "limit", default=100, most=MAX_LIMIT,
                          meaning=f"an integer between 0 and {MAX_LIMIT}")
        after = _after(request.query_params.get("after"))
        chosen = _filter(request)
        found = [summary_of(letter) for letter in await self._letters(endpoint_id, chosen)
                 if after is None or _order(letter) > after]
        found.sort(key=_order)
        page = found[:limit]
        more = len(found) > limit and limit > 0
        return json_response(encoder.encode(DeadLetterPage(
            deadLetters=page, next=_cursor(page[-1]) if more else None)))

    async def get(self, request: Request) -> Response:
        endpoint_id = await self._endpoint(request)
        letter = await self._letter(endpoint_id, request.path_params["job_id"])
        data = await self._input(letter)
        summary = summary_of(letter)
        view = DeadLetterView(**msgspec.structs.asdict(summary),
                              input=Raw(data) if data is not None else UNSET)
        return json_response(encoder.encode(view))

    async def delete_one(self, request: Request) -> Response:
        endpoint_id = await self._endpoint(request)
        letter = await self._letter(endpoint_id, request.path_params["job_id"])
        await self._delete(letter)
        return json_response(encoder.encode(Deleted(id=letter.job_id)))

    async def delete_many(self, request: Request) -> Response:
        endpoint_id = await self._endpoint(request)
        letters = await self._letters(endpoint_id, _filter(request))
        for letter in letters:
            await self._delete(letter)
        log.info("dead letters deleted", endpoint_id=endpoint_id, count=len(letters))
        return json_response(encoder.encode(DeadLettersDeleted(deleted=len(letters))))

    async def replay(self, request: Request) -> Response:
        endpoint_id = await self._endpoint(request)
        asked = await decoded_body(request, _replay_decoder, cap_bytes=MAX_REPLAY_BODY_BYTES,
                                   op="dead-letters/replay", context="replay")
        if (asked.jobIds is None) == (not asked.all):
            raise ApiError(400, "replay: name the dead letters in `jobIds`, or send `all: true` (not both)")
        target_id = asked.endpointId or endpoint_id
        if not access_in(request).may_use(target_id):
            raise ApiError(403, f"this API key may not use endpoint {target_id!r}")
        target = await self.catalog.get(target_id)
        if target is None:
            raise ApiError(404, f"endpoint {target_id!r} not found")
        skipped: list[ReplaySkipped] = []
        if asked.jobIds is not None:
            letters = []
            for job_id in dict.fromkeys(asked.jobIds):
                found = await self.bus.dead_letters.get(subjects.dead_letter_key(endpoint_id, job_id))
                if found is None:
                    skipped.append(ReplaySkipped(deadLetter=job_id, reason="no such dead letter"))
                else:
                    letters.append(found.value)
        else:
            letters = await self._letters(endpoint_id, Filter(since_ms=asked.since, until_ms=asked.until,
                                                              error=asked.error))
            letters.sort(key=_order, reverse=True)  # oldest first: replayed in the order they came
        replayed: list[ReplayedJob] = []
        for letter in letters:
            data = await self._input(letter)
            if data is None:
                skipped.append(ReplaySkipped(deadLetter=letter.job_id, reason="its input expired"))
                continue
            record = await self.jobs.submit(target, new_job_id(), input_raw=data, sync=False,
                                            policy=letter.policy, webhook=letter.webhook,
                                            extra_json=letter.extra_json)
            await self._link(letter, DeadLetterReplay(endpoint_id=target.id, job_id=record.id,
                                                      replayed_at_ms=self.clock.now_ms()))
            replayed.append(ReplayedJob(deadLetter=letter.job_id, endpointId=target.id, id=record.id,
                                        status=record.status))
        log.info("dead letters replayed", endpoint_id=endpoint_id, target=target.id, count=len(replayed))
        return json_response(encoder.encode(DeadLettersReplayed(replayed=replayed, skipped=skipped)))

    # -- internals --------------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> str:
        """The endpoint id of the path; dead letters of a deleted endpoint stay reachable."""
        endpoint_id = request.path_params["endpoint_id"]
        if not is_valid_id(endpoint_id):
            raise ApiError(404, f"endpoint {endpoint_id[:128]!r} not found")
        return endpoint_id

    async def _letter(self, endpoint_id: str, job_id: str) -> DeadLetter:
        found = (await self.bus.dead_letters.get(subjects.dead_letter_key(endpoint_id, job_id))
                 if is_valid_id(job_id) else None)
        if found is None:
            raise ApiError(404, f"no dead letter for job {job_id[:128]!r} on endpoint {endpoint_id!r}")
        return found.value

    async def _letters(self, endpoint_id: str, chosen: Filter) -> list[DeadLetter]:
        """The endpoint's dead letters that match, read a page at a time; inputs dropped."""
        found: list[DeadLetter] = []
        async for page in self.bus.dead_letters.pages(subjects.endpoint_dead_letters_filter(endpoint_id)):
            found += [msgspec.structs.replace(letter, input_json=None) if letter.input_json else letter
                      for _, letter in page if chosen.matches(letter)]
        return found

    async def _input(self, letter: DeadLetter) -> bytes | None:
        if letter.input_json is None and letter.input_ref is None:  # a listed (stripped) letter
            key = subjects.dead_letter_key(letter.endpoint_id, letter.job_id)
            full = await self.bus.dead_letters.get(key)
            if full is None:
                return None
            letter = full.value
        return await self.bus.payloads.load(letter.input_json, letter.input_ref)

    async def _link(self, letter: DeadLetter, replay: DeadLetterReplay) -> None:
        """Add the replay to the dead letter (CAS), keeping what is left of its retention."""
        key = subjects.dead_letter_key(letter.endpoint_id, letter.job_id)
        for _ in range(10):
            current = await self.bus.dead_letters.get(key)
            if current is None:
                return  # deleted or expired meanwhile: the new job stands on its own
            left_s = (current.value.failed_at_ms / 1000 + self.bus.settings.dead_letter_retention_s
                      - self.clock.now_ms() / 1000)
            new = msgspec.structs.replace(current.value, replays=(*current.value.replays, replay))
            try:
                await self.bus.dead_letters.update(key, new, current.revision, ttl_s=max(left_s, 1.0))
                return
            except Conflict:
                continue
        log.warning("replay not linked to its dead letter", job_id=letter.job_id, replay=replay.job_id)

    async def _delete(self, letter: DeadLetter) -> None:
        await self.bus.dead_letters.delete(subjects.dead_letter_key(letter.endpoint_id, letter.job_id))
        # The large input outlived the job's record for this dead letter; while the record is
        # still there (/retry may want it) the object's TTL ends it instead.
        record_key = subjects.job_key(letter.endpoint_id, letter.job_id)
        if letter.input_ref and await self.bus.jobs.get(record_key) is None:
            try:
                await self.bus.payloads.delete(letter.input_ref)
            except Exception as exc:
                log.warning("dead letter input not deleted", job_id=letter.job_id, error=repr(exc))

