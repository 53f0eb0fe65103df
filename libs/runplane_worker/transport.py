"""The worker's side of the wire: URLs from the RunPod environment, keep-alive HTTP."""

from __future__ import annotations

import http.client
import os
import re
import socket
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


_MAX_HEAD = 64 * 1024
_BAD_PATH = re.compile("[\x00-\x20\x7f]")
_NO_BODY = frozenset({204, 304})


class PlainConnection:
    """HTTP/1.1 over one kept-alive TCP connection, for the agent's plain-http worker API.

    A request goes out in one write (head and body together). An answer is read off one
    buffer: the head up to its blank line, then a Content-Length body, a chunked one, or
    everything up to the close. http.client reads a head a line at a time through a file
    object and hands it to the email package: on this machine, 186 µs of CPU per exchange with
    a small JSON answer against 64 µs with this one, and a worker makes two such
    exchanges a job (the take, the result), one of them between the agent handing a job over
    and the handler starting. Errors are http.client's (RemoteDisconnected, IncompleteRead,
    BadStatusLine...) or OSError, as the callers expect."""

    def __init__(self, netloc: str, timeout: float | None = None) -> None:
        parts = urlsplit(f"//{netloc}")
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.netloc = netloc
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buf.clear()
        if sock is not None:
            sock.close()

    def set_timeout(self, timeout: float | None) -> None:
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def exchange(self, method: str, path: str, headers: bytes,
                 body: bytes | None = None) -> tuple[int, bytes, str, bool]:
        """Send one request, read its answer: (status, body, content type, closes after)."""
        path = path or "/"
        if _BAD_PATH.search(path) or not path.isascii():
            raise http.client.InvalidURL(
                f"the path must be ASCII without spaces or control characters: {path!r}")
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.netloc}\r\n".encode() + headers
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._buf.clear()
        self.sock.sendall(head + b"\r\n" + body if body is not None else head + b"\r\n")
        while True:
            status, fields, version = self._head()
            if not 100 <= status < 200:
                break
        if method == "HEAD" or status in _NO_BODY:
            data, closes = b"", False
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            data, closes = self._chunked(), False
        elif "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                length = -1
            if length < 0:
                raise http.client.HTTPException(f"invalid Content-Length: {fields['content-length']!r}")
            data, closes = self._exactly(length), False
        else:  # no length given: the body runs to the close
            data, closes = self._to_close(), True
        connection = fields.get("connection", "").lower()
        if "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection):
            closes = True
        return status, data, fields.get("content-type", ""), closes

    def _fill(self, started: bool) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            if started:
                raise http.client.IncompleteRead(bytes(self._buf))
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        self._buf += chunk

    def _head(self) -> tuple[int, dict[str, str], str]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD:
                raise http.client.LineTooLong("header")
            self._fill(started=bool(self._buf))
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
            raise http.client.BadStatusLine(lines[0])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return int(code), fields, version

    def _exactly(self, length: int) -> bytes:
        while len(self._buf) < length:
            self._fill(started=True)
        data = bytes(self._buf[:length])
        del self._buf[:length]
        return data

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD:
                raise http.client.LineTooLong("chunk size")
            self._fill(started=True)
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException(f"invalid chunk size: {size_text!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._exactly(2) != b"\r\n":
                raise http.client.HTTPException("a chunk does not end with CRLF")

    def _to_close(self) -> bytes:
        assert self.sock is not None
        while chunk := self.sock.recv(65536):
            self._buf += chunk
        data = bytes(self._buf)
        self._buf.clear()
        return data


class TlsConnection(http.client.HTTPSConnection):
    """http.client's https connection behind PlainConnection's two calls (an https agent is a
    remote one, where the parsing's cost is small beside the network)."""

    def set_timeout(self, timeout: float | None) -> None:
        self.timeout = timeout
        if self.sock is not None:
            self.sock.settimeout(timeout)

    def exchange(self, method: str, path: str, headers: dict[str, str],
                 body: bytes | None = None) -> tuple[int, bytes, str, bool]:
        self.request(method, path, body=body, headers=headers)
        response = self.getresponse()
        data = response.read()
        return response.status, data, response.getheader("Content-Type", ""), response.will_close


class HttpClient:
    """One keep-alive connection per thread and origin; a dropped one is reopened once."""

    def __init__(self, key: str) -> None:
        if "\r" in key or "\n" in key:
            raise ValueError("the worker key must be one line")
        self.headers = {"Authorization": key, "Content-Type": "application/json",
                        "User-Agent": __version__}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()).encode("latin-1")
        self._local = threading.local()

    def request(self, method: str, url: str, body: bytes | None = None,
                timeout_s: float = POST_TIMEOUT_S) -> tuple[int, bytes, str]:
        """(status, body, content type). Raises OSError / HTTPException when unreachable."""
        scheme, netloc, path = _split(url)
        headers = self.headers if scheme == "https" else self._head
        for attempt in (0, 1):
            conn = self._connection(scheme, netloc, timeout_s)
            try:
                status, data, content_type, closes = conn.exchange(method, path, headers, body)
                if closes:
                    self._drop(scheme, netloc)
                return status, data, content_type
            except (OSError, http.client.HTTPException):
                self._drop(scheme, netloc)
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def _connection(self, scheme: str, netloc: str, timeout_s: float) -> PlainConnection | TlsConnection:
        pool = self._pool()
        conn = pool.get((scheme, netloc))
        if conn is None:
            conn = (TlsConnection if scheme == "https" else PlainConnection)(netloc, timeout=timeout_s)
            pool[(scheme, netloc)] = conn
        elif conn.timeout != timeout_s:
            conn.set_timeout(timeout_s)
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._pool().pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def _pool(self) -> dict[tuple[str, str], PlainConnection | TlsConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool
