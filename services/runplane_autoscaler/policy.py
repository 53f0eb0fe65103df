"""How many workers an endpoint wants: a pure function of its spec, a sample and the state.

`decide(spec, signals, state, now_ms) -> (ScaleTarget, state)`; no I/O, no clock, no
logging: the reason for each decision is returned in the target.

The rules (RunPod's endpoint settings, with hysteresis so a steady load gives a flat count):

* the result is always within [workersMin, workersMax];
* scale up at once: `REQUEST_COUNT` wants ceil((inQueue + inProgress) / scalerValue)
  workers; `QUEUE_DELAY` adds one worker when the oldest queued job has waited longer
  than scalerValue seconds (at most one per scalerValue seconds, so a slow cold start
  does not add a worker every tick), and wants at least one worker whenever there is
  any work, so an endpoint scales from zero as soon as a job is queued;
* scale down one worker per decision, only once the surplus has lasted `idleTimeout`
  seconds, never to zero before the endpoint had no queued or in-progress work for
  `idleTimeout` seconds, and never below the number of busy workers;
* flash endpoints keep workers pre-warmed (live or parked together, at most workersMax)
  whatever the count, so a quiet endpoint's next job is a flash start: `prewarmWorkers`,
  more in open warm windows, and ahead of recurring daily load (prewarm.py); the scheduler
  places them (parked from the start) and they never count as workers here;
* capacity-aware: while the scheduler reports workers of the endpoint that no node can take
  (KV `rp-placement`), the target says so (`throttled`, with the reason) and a GPU endpoint
  never asks for more workers than the whole fleet could hold of its shape; nothing is
  started or stopped for them meanwhile, and the count follows the demand again as soon as
  capacity appears;
* low-priority jobs (`policy.lowPriority`) never add a worker: only normal jobs count
  toward the demand. They run on workers that exist anyway; while there are any, the
  last worker is kept (its idle window restarts) as for any other work.

`split_by_priority` turns what the sampler reads (consumer and stream counts, the
jobs node agents report) into the counts of `Signals`.
"""

from __future__ import annotations

import msgspec

from runplane_autoscaler.prewarm import Profile, ProfileConfig, observe, prewarm_workers
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.scaling import ScaleTarget

DEFAULT_PROFILE = ProfileConfig()


class Signals(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of an endpoint's load (what `signals.sample` reads from the bus).

    `in_queue`, `in_progress` and `oldest_queued_age_ms` are about normal jobs only;
    low-priority jobs are counted apart in `low_*`.
    """

    in_queue: int = 0
    in_progress: int = 0
    oldest_queued_age_ms: int = 0
    workers_total: int = 0
    workers_busy: int = 0
    workers_idle: int = 0
    low_in_queue: int = 0
    low_in_progress: int = 0
    # Workers the scheduler could not place for want of capacity (KV `rp-placement`), and why.
    pending_workers: int = 0
    pending_reason: str = ""
    # GPU endpoints: the most workers of the endpoint's shape the whole fleet could hold
    # (-1: not known, or a CPU endpoint).
    capacity_workers: int = -1


class QueueCounts(msgspec.Struct, frozen=True, kw_only=True):
    """What the sampler reads about one endpoint's queues, before the split by priority.

    The consumer takes both queues, so its counts mix both priorities; the stream counts
    the normal queue alone; node agents report the low-priority jobs their workers hold.
    """

    # Consumer: messages not delivered yet / delivered and not acked (both queues).
    pending: int = 0
    ack_pending: int = 0
    # Stream: messages on the normal queue (not acked: waiting or held).
    normal_unacked: int = 0
    # Whether a normal message waits beyond the consumer's position (its oldest was found).
    normal_waiting: bool = False
    # Low-priority jobs held by workers on live nodes, as their agents last reported.
    low_running_reported: int = 0


class PrioritySplit(msgspec.Struct, frozen=True, kw_only=True):
    in_queue: int
    in_progress: int
    low_in_queue: int
    low_in_progress: int


def split_by_priority(counts: QueueCounts) -> PrioritySplit:
    """Split the endpoint's jobs into (normal, low) × (queued, in progress).

    The normal total comes from the stream alone and whether a normal job waits from the
    queue itself, so the normal counts (all that can scale up) never include low-priority
    jobs, however stale the agents' reports are. The reports only decide how the rest is
    split; with counts read at one instant and fresh reports the split is exact.
    """
    pending, ack_pending = max(0, counts.pending), max(0, counts.ack_pending)
    normal = max(0, counts.normal_unacked)
    low = max(0, pending + ack_pending - normal)
    # Low-priority jobs in progress: what the agents report, within what the counts allow.
    low_running_min, low_running_max = max(0, low - pending), min(low, ack_pending)
    low_running = max(low_running_min, min(counts.low_running_reported, low_running_max))
    low_queued = max(0, low - low_running)
    in_queue = min(normal, max(1, pending - low_queued)) if counts.normal_waiting else 0
    in_progress = normal - in_queue
    return PrioritySplit(
        in_queue=in_queue, in_progress=in_progress, low_in_queue=max(0, pending - in_queue),
        low_in_progress=max(0, ack_pending - in_progress),
    )


class ScaleState(msgspec.Struct, frozen=True, kw_only=True):
    """What `decide` remembers between calls (persisted inside the ScaleTarget)."""

    desired_workers: int
    last_active_at_ms: int = 0
    last_needed_at_ms: int = 0
    last_scale_up_at_ms: int = 0
    profile: Profile = Profile()


def bounds(spec: EndpointSpec) -> tuple[int, int]:
    """[low, high] worker count; a spec with min > max is read as min = max = workersMin."""
    low = max(0, spec.workers_min)
    return low, max(low, spec.workers_max)


def clamp(spec: EndpointSpec, n: int) -> int:
    low, high = bounds(spec)
    return min(high, max(low, n))


def initial_state(spec: EndpointSpec, now_ms: int) -> ScaleState:
    """The state of an endpoint seen for the first time: at workersMin, nothing to remember."""
    return ScaleState(desired_workers=clamp(spec, 0), last_needed_at_ms=now_ms)


def state_of(target: ScaleTarget) -> ScaleState:
    """The state persisted in a ScaleTarget (written by `decide`)."""
    return ScaleState(
        desired_workers=target.desired_workers, last_active_at_ms=target.last_active_at_ms,
        last_needed_at_ms=target.last_needed_at_ms, last_scale_up_at_ms=target.last_scale_up_at_ms,
        profile=Profile(load=target.load_profile, slot=target.profile_slot, peak=target.slot_peak),
    )


def needed_workers(spec: EndpointSpec, signals: Signals, state: ScaleState, now_ms: int) -> tuple[int, str]:
    """The count the scaler asks for now (before bounds and hysteresis), and why."""
    queued, running = max(0, signals.in_queue), max(0, signals.in_progress)
    current = state.desired_workers
    if spec.scaler_type == "REQUEST_COUNT":
        per_worker = max(1, spec.scaler_value)
        need = -(-(queued + running) // per_worker)
        reason = f"{queued} queued + {running} in progress at {per_worker} per worker"
    else:
        delay_ms = max(0, spec.scaler_value) * 1000
        age_ms = signals.oldest_queued_age_ms
        if queued and age_ms > delay_ms:
            if current == 0 or now_ms - state.last_scale_up_at_ms >= delay_ms:
                need, reason = current + 1, f"oldest queued job waited {age_ms} ms > {delay_ms} ms"
            else:
                need, reason = current, f"oldest queued job waited {age_ms} ms; a worker was added recently"
        elif queued:
            need, reason = current, f"{queued} queued, oldest waited {age_ms} ms <= {delay_ms} ms"
        else:
            # Without a queue this scaler never adds workers; it only keeps the busy ones.
            need, reason = min(current, running), f"nothing queued, {running} in progress"
    if queued + running > 0 and need < 1:
        need, reason = 1, f"{reason}; work needs at least one worker"
    low = max(0, signals.low_in_queue) + max(0, signals.low_in_progress)
    if low:
        reason = f"{reason}; {low} low-priority (never scale up)"
    return need, reason


def decide(spec: EndpointSpec, signals: Signals, state: ScaleState | None,
           now_ms: int, profile_config: ProfileConfig = DEFAULT_PROFILE) -> tuple[ScaleTarget, ScaleState]:
    """The endpoint's desired worker count and the state to pass to the next call."""
    if state is None:
        state = initial_state(spec, now_ms)
    current = clamp(spec, state.desired_workers)
    state = msgspec.structs.replace(state, desired_workers=current)
    # Low-priority work keeps the last worker like any work; it only never adds one.
    active = (signals.in_queue > 0 or signals.in_progress > 0 or signals.low_in_queue > 0
              or signals.low_in_progress > 0)
    last_active = now_ms if active else state.last_active_at_ms
    need, why = needed_workers(spec, signals, state, now_ms)
    last_needed = now_ms if need >= current else state.last_needed_at_ms
    last_up = state.last_scale_up_at_ms
    idle_ms = max(0, spec.idle_timeout_s) * 1000

    throttled = ""
    if signals.pending_workers > 0:
        # Workers already wanted find no capacity: never ask for more than the whole fleet
        # could hold for this endpoint (its real demand within that stays, so contended
        # capacity is divided by what each endpoint really wants); scaling on resumes at
        # the next decision once capacity appears.
        throttled = f"{signals.pending_workers} workers wait for capacity: {signals.pending_reason}"
        if signals.capacity_workers >= 0 and need > max(current, signals.capacity_workers):
            need = max(current, signals.capacity_workers)
            why = f"{why}; the fleet holds at most {signals.capacity_workers} such workers"
    if need > current:
        desired = clamp(spec, need)
        reason = f"scale up: {why}" if desired > current else f"at workersMax: {why}"
    elif need == current:
        desired, reason = current, f"hold: {why}"
    elif now_ms - last_needed < idle_ms:
        desired, reason = current, f"hold (surplus for {now_ms - last_needed} ms < idle timeout): {why}"
    elif current == 1 and now_ms - last_active < idle_ms:
        desired, reason = current, f"hold (last work {now_ms - last_active} ms ago < idle timeout): {why}"
    else:
        floor = max(need, signals.workers_busy)
        desired = clamp(spec, max(current - 1, floor))
        if desired < current:
            reason = f"scale down: surplus for {now_ms - last_needed} ms >= idle timeout; {why}"
        elif signals.workers_busy >= current:
            reason = f"hold: {signals.workers_busy} workers busy; {why}"
        else:
            reason = f"at workersMin: {why}"
    if throttled:
        reason = f"throttled ({throttled}); {reason}"
    if desired > current:
        last_up = now_ms
    # Learn the daily load (flash endpoints: only they can be pre-warmed), then pre-warm.
    profile = state.profile
    if spec.flashboot:
        profile = observe(profile, now_ms, max(desired, signals.workers_busy), profile_config)
    prewarm, prewarm_why = prewarm_workers(spec, now_ms, profile, profile_config)
    if prewarm:
        reason = f"{reason}; {prewarm} pre-warmed ({prewarm_why})"
    new_state = ScaleState(desired_workers=desired, last_active_at_ms=last_active,
                           last_needed_at_ms=last_needed, last_scale_up_at_ms=last_up, profile=profile)
    target = ScaleTarget(
        endpoint_id=spec.id, desired_workers=desired, reason=reason, decided_at_ms=now_ms,
        last_active_at_ms=last_active, last_needed_at_ms=last_needed, last_scale_up_at_ms=last_up,
        prewarm_workers=prewarm, load_profile=profile.load, profile_slot=profile.slot,
        slot_peak=profile.peak, throttled=throttled,
    )
    return target, new_state
