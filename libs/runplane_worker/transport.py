"""The worker's side of the wire: URLs from the RunPod environment, keep-alive HTTP."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

from runplane_worker.version import __version__

# The RunPod SDK cuts a take or stop poll after 90 s; the server answers well before.
POLL_TIMEOUT_S = 90.0
POST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Urls:
    """URL templates handed over by the platform (RunPod's env var names and placeholders)."""

    take_url: str
    done_template: str
    stream_template: str
    ping_url: str | None
    key: str
    worker_id: str
    ping_interval_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Urls | None:
        env = os.environ if env is None else env
        take = env.get("RUNPOD_WEBHOOK_GET_JOB")
        if not take:
            return None
        worker_id = env.get("RUNPOD_POD_ID", "local")
        ping = env.get("RUNPOD_WEBHOOK_PING")
        return cls(
            take_url=take.replace("$ID", worker_id),
            done_template=env.get("RUNPOD_WEBHOOK_POST_OUTPUT", "").replace("$RUNPOD_POD_ID", worker_id),
            stream_template=env.get("RUNPOD_WEBHOOK_POST_STREAM", "").replace("$RUNPOD_POD_ID", worker_id),
            ping_url=ping.replace("$RUNPOD_POD_ID", worker_id) if ping else None,
            key=env.get("RUNPOD_AI_API_KEY", ""),
            worker_id=worker_id,
            ping_interval_s=max(int(env.get("RUNPOD_PING_INTERVAL", "10000")) / 1000, 1.0),
        )

    def take(self, batch_size: int, holding: bool) -> str:
        flag = "1" if holding else "0"
        if batch_size > 1:
            url = self.take_url.replace("/job-take/", "/job-take-batch/")
            return f"{url}&batch_size={batch_size}&job_in_progress={flag}"
        return f"{self.take_url}&job_in_progress={flag}"

    def stop(self) -> str | None:
        if "/job-take/" not in self.take_url:
            return None
        return self.take_url.replace("/job-take/", "/job-stop/")

    def done(self, job_id: str, is_stream: bool) -> str:
        flag = "true" if is_stream else "false"
        return f"{self.done_template.replace('$ID', job_id)}&isStream={flag}"

    def stream(self, job_id: str) -> str:
        return self.stream_template.replace("$ID", job_id) + "&isStream=false"

    def ping(self, job_ids: list[str]) -> str | None:
        if self.ping_url is None:
            return None
        jobs = f"&job_id={quote(','.join(job_ids))}" if job_ids else ""
        return f"{self.ping_url}{jobs}&runpod_version={quote(__version__)}"


@lru_cache(maxsize=64)
def _split(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.netloc, path


class OneSendConnection(http.client.HTTPConnection):
    """An HTTP connection that sends a request's head and a bytes body in one write: the
    standard one writes them apart, two packets and two wake-ups of the agent per result."""

    def _send_output(self, message_body=None, encode_chunked=False):  # noqa: ANN001
        if not isinstance(message_body, bytes) or encode_chunked:
            return super()._send_output(message_body, encode_chunked=encode_chunked)
        self._buffer.extend((b"", b""))
        head = b"\r\n".join(self._buffer)
        del self._buffer[:]
        self.send(head + message_body)
        return None


class HttpClient:
    """One keep-alive connection per thread and origin; a dropped one is reopened once."""

    def __init__(self, key: str) -> None:
        self.headers = {"Authorization": key, "Content-Type": "application/json",
                        "User-Agent": __version__}
        self._local = threading.local()

    def request(self, method: str, url: str, body: bytes | None = None,
                timeout_s: float = POST_TIMEOUT_S) -> tuple[int, bytes, str]:
        """(status, body, content type). Raises OSError / HTTPException when unreachable."""
        scheme, netloc, path = _split(url)
        for attempt in (0, 1):
            conn = self._connection(scheme, netloc, timeout_s)
            try:
                conn.request(method, path, body=body, headers=self.headers)
                response = conn.getresponse()
                data = response.read()
                if response.will_close:
                    self._drop(scheme, netloc)
                return response.status, data, response.getheader("Content-Type", "")
            except (OSError, http.client.HTTPException):
                self._drop(scheme, netloc)
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def _connection(self, scheme: str, netloc: str, timeout_s: float) -> http.client.HTTPConnection:
        pool = self._pool()
        conn = pool.get((scheme, netloc))
        if conn is None:
            factory = http.client.HTTPSConnection if scheme == "https" else OneSendConnection
            conn = factory(netloc, timeout=timeout_s)
            pool[(scheme, netloc)] = conn
        elif conn.timeout != timeout_s:
            conn.timeout = timeout_s
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._pool().pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _pool(self) -> dict[tuple[str, str], http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool
