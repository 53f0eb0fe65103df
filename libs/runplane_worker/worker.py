"""The worker loop: take jobs, run the handler, report results, ping, honour stops.

With concurrency 1 the main thread takes and runs jobs itself and asks for the next
one as soon as a result is posted (no pause). With concurrency N it takes with
`job-take-batch` (batch size = free slots) and N threads run the jobs.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import sys
import threading
import time
from asyncio import CancelledError
from collections.abc import Callable
from typing import Any

from runplane_worker import results
from runplane_worker.transport import POLL_TIMEOUT_S, HttpClient, Urls


def log(message: str) -> None:
    print(f"runplane_worker | {message}", file=sys.stderr, flush=True)


class Worker:
    def __init__(self, config: dict[str, Any], urls: Urls) -> None:
        self.handler: Callable = config["handler"]
        self.aggregate = bool(config.get("return_aggregate_stream", False))
        self.refresh = bool(config.get("refresh_worker", False))
        # The config wins; else RP_WORKER_CONCURRENCY lets an endpoint's env tune it without code.
        concurrency = config.get("concurrency") or os.environ.get("RP_WORKER_CONCURRENCY") or 1
        self.concurrency = max(1, int(concurrency))
        self.generator = results.is_generator(self.handler)
        self.urls = urls
        self.http = HttpClient(urls.key)
        self.exiting = threading.Event()
        self._slots = threading.Condition()
        # job id -> the runner executing it (to cancel an async handler on a stop)
        self._in_flight: dict[str, results.AsyncRunner] = {}
        self._stopped: set[str] = set()
        self._backoff_s = 0.0

    # -- loops ------------------------------------------------------------------------------

    def run(self) -> None:
        for target in (self._ping_loop, self._stop_loop):
            threading.Thread(target=target, daemon=True).start()
        if self.concurrency == 1:
            runner = results.AsyncRunner()
            while not self.exiting.is_set():
                for job in self._take(1):
                    self._process(job, runner)
        else:
            self._run_parallel()

    def _run_parallel(self) -> None:
        jobs: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        for _ in range(self.concurrency):
            threading.Thread(target=self._run_jobs, args=(jobs,), daemon=True).start()
        while not self.exiting.is_set():
            with self._slots:
                while len(self._in_flight) >= self.concurrency and not self.exiting.is_set():
                    self._slots.wait(0.5)
                free = self.concurrency - len(self._in_flight)
            if free <= 0:
                continue
            for job in self._take(free):
                jobs.put(job)
        with self._slots:  # refresh_worker: let the jobs in hand finish first
            while self._in_flight:
                self._slots.wait(0.5)

    def _run_jobs(self, jobs: queue.SimpleQueue) -> None:
        runner = results.AsyncRunner()
        while True:
            self._process(jobs.get(), runner)

    # -- one job ----------------------------------------------------------------------------

    def _process(self, job: dict[str, Any], runner: results.AsyncRunner) -> None:
        job_id = job["id"]
        with self._slots:
            self._in_flight[job_id] = runner
        try:
            if job_id in self._stopped:  # stopped while it waited for a thread
                return
            if self.generator:
                final = self._stream(job, runner)
            else:
                final = results.run(self.handler, job, runner)
            if final is not None and job_id not in self._stopped:
                if self.refresh:
                    final["stopPod"] = True
                self._post(self.urls.done(job_id, self.generator), final)
        except CancelledError:
            log(f"job {job_id} stopped")
        finally:
            with self._slots:
                self._in_flight.pop(job_id, None)
                self._stopped.discard(job_id)
                self._slots.notify_all()
        if self.refresh:
            self.exiting.set()

    def _stream(self, job: dict[str, Any], runner: results.AsyncRunner) -> dict[str, Any] | None:
        job_id = job["id"]
        final: dict[str, Any] = {"output": []}
        for chunk in results.stream(self.handler, job, runner):
            end = results.stream_result(chunk)
            if end is not None:
                return end
            if job_id in self._stopped:
                return None
            if self.aggregate:
                final["output"].append(chunk["output"])
            self._post(self.urls.stream(job_id), chunk)
        return final

    # -- wire -------------------------------------------------------------------------------

    def _take(self, batch_size: int) -> list[dict[str, Any]]:
        url = self.urls.take(batch_size, holding=bool(self._in_flight))
        try:
            status, body, content_type = self.http.request("GET", url, timeout_s=POLL_TIMEOUT_S)
        except (OSError, http.client.HTTPException) as exc:
            self._back_off(f"take failed: {exc!r}")
            return []
        if status in (204, 400):
            self._backoff_s = 0.0
            return []
        if status == 429:
            time.sleep(5)
            return []
        if status != 200 or not body or "json" not in content_type:
            self._back_off(f"take answered {status}")
            return []
        self._backoff_s = 0.0
        try:
            taken = json.loads(body)
        except ValueError:
            log("take answered with invalid JSON")
            return []
        if isinstance(taken, dict):
            taken = [taken]
        jobs = [j for j in taken if isinstance(j, dict) and "id" in j and "input" in j]
        with self._slots:  # held from now on: listed in pings
            for job in jobs:
                self._in_flight.setdefault(job["id"], results.AsyncRunner())
        return jobs

    def _post(self, url: str, data: dict[str, Any]) -> None:
        try:
            body = json.dumps(data, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            # The RunPod SDK drops such a result and the job never ends; fail it instead.
            body = json.dumps({"error": f"result is not JSON serializable: {exc}"}).encode()
        for attempt in range(3):
            try:
                status, _, _ = self.http.request("POST", url, body)
            except (OSError, http.client.HTTPException) as exc:
                status, error = 0, repr(exc)
            else:
                error = f"HTTP {status}"
                if status < 500:
                    if status >= 400:
                        log(f"result refused ({error}): {url}")
                    return
            time.sleep(0.5 * (attempt + 1))
        log(f"giving up on posting a result ({error}): {url}")

    def _back_off(self, why: str) -> None:
        self._backoff_s = min(max(self._backoff_s * 2, 0.1), 5.0)
        log(f"{why}; retrying in {self._backoff_s:.1f} s")
        time.sleep(self._backoff_s)

    def _ping_loop(self) -> None:
        while not self.exiting.is_set():
            with self._slots:
                holding = list(self._in_flight)
            url = self.urls.ping(holding)
            if url is None:
                return
            try:
                self.http.request("GET", url, timeout_s=2 * self.urls.ping_interval_s)
            except (OSError, http.client.HTTPException):
                pass
            self.exiting.wait(self.urls.ping_interval_s)

    def _stop_loop(self) -> None:
        url = self.urls.stop()
        while url is not None and not self.exiting.is_set():
            try:
                status, body, _ = self.http.request("GET", url, timeout_s=POLL_TIMEOUT_S)
            except (OSError, http.client.HTTPException):
                time.sleep(1)
                continue
            if status == 200:
                try:
                    ids = json.loads(body).get("jobsToStop", [])
                except (ValueError, AttributeError):
                    ids = []
                for job_id in ids:
                    self.stop(job_id)
            elif status == 429:
                time.sleep(5)
            elif status != 204:
                time.sleep(1)

    def stop(self, job_id: str) -> None:
        """Stop one job: an async handler is cancelled; a sync one runs on but reports nothing."""
        with self._slots:
            runner = self._in_flight.get(job_id)
            if runner is None:
                return
            self._stopped.add(job_id)
        runner.cancel()

    def progress(self, job_id: str, progress: Any) -> None:
        self._post(self.urls.done(job_id, False), {"status": "IN_PROGRESS", "output": progress})
