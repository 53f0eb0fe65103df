"""One write per HTTP message on the job path: our servers' answers
(runplane_service.http_protocol) and the worker SDK's requests (runplane_worker.transport),
and the SDK's reading of every kind of answer.

A real uvicorn server in its own process, real clients over keep-alive connections; write
syscalls are counted by the kernel (/proc/<pid>/io `syscw`). uvicorn as it comes writes an
answer's head and body apart, and so does http.client a request's: two writes per message."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest

from runplane_testing.natsserver import free_port, wait_port
from runplane_worker.transport import HttpClient, PlainConnection

SERVER = textwrap.dedent("""
    import asyncio, sys
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
    from runplane_service.lifecycle import run_service, serve_http

    async def small(request):
        return Response(b'{"ok":true}', media_type="application/json")

    async def echo(request):
        return Response(await request.body(), media_type="application/json")

    async def streamed(request):
        async def parts():
            for i in range(3):
                yield b"part%d;" % i
                await asyncio.sleep(0)
        return StreamingResponse(parts(), media_type="text/plain")

    async def empty(request):
        return Response(status_code=204)

    async def closing(request):
        return Response(b"bye", media_type="text/plain", headers={"Connection": "close"})

    async def main(stack, stop):
        app = Starlette(routes=[Route("/small", small), Route("/streamed", streamed),
                                   Route("/echo", echo, methods=["POST"]), Route("/empty", empty),
                                   Route("/closing", closing)])
        await serve_http(app, "127.0.0.1", int(sys.argv[1]), stop)
        await stop.wait()

    run_service("http-protocol-test", main)
""")
ANSWERS = 200


def _writes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/<pid>/io")


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        wait_port("127.0.0.1", port)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_each_answer_is_one_write_and_arrives_whole(server) -> None:
    proc, url = server
    with httpx.Client(base_url=url) as http:
        assert http.get("/small").json() == {"ok": True}  # the connection is open and warm
        before = _writes(proc.pid)
        for _ in range(ANSWERS):
            resp = http.get("/small")
            assert resp.status_code == 200 and resp.json() == {"ok": True}
            assert resp.headers["content-length"] == "11"
        writes = _writes(proc.pid) - before
    # One write per answer (a little room for the process's own housekeeping); two would be 2x.
    assert ANSWERS <= writes < ANSWERS * 1.25, writes


def test_streamed_answers_and_connection_close_still_arrive_whole(server) -> None:
    _, url = server
    with httpx.Client(base_url=url) as http:
        for _ in range(3):
            assert http.get("/streamed").text == "part0;part1;part2;"
        # The server closes after answering: what it wrote before closing is not lost.
        resp = http.get("/small", headers={"Connection": "close"})
        assert resp.json() == {"ok": True} and resp.headers.get("connection") == "close"



def test_the_worker_sdk_sends_each_request_in_one_write() -> None:
    """Over a socket that keeps message boundaries (a real SOCK_SEQPACKET pair): a result's
    head and body come as one message; http.client's own connection sends two."""
    body = b'{"output": {"text": "' + b"x" * 2000 + b'"}}'
    head = b"Authorization: key\r\nContent-Type: application/json\r\n"
    for kind in ("sdk", "http.client"):
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, peer:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            if kind == "sdk":
                conn = PlainConnection("agent.test")
                conn.sock = ours
                assert conn.exchange("POST", "/v2/ep/job-done/w/j?isStream=false", head, body) == (
                    200, b"{}", "", False)
                messages = 1
            else:
                plain = http.client.HTTPConnection("agent.test")
                plain.sock = ours
                plain.request("POST", "/v2/ep/job-done/w/j?isStream=false", body=body,
                              headers={"Authorization": "key", "Content-Type": "application/json"})
                messages = 2
            peer.setblocking(False)
            sent = []
            while True:
                try:
                    sent.append(peer.recv(1 << 16))
                except BlockingIOError:
                    break
        assert len(sent) == messages, (kind, sent)
        head_sent, _, rest = b"".join(sent).partition(b"\r\n\r\n")
        assert head_sent.startswith(b"POST /v2/ep/job-done/w/j?isStream=false HTTP/1.1\r\n")
        assert b"Content-Length: %d" % len(body) in head_sent and rest == body


def test_the_worker_sdk_reads_every_kind_of_answer_over_one_kept_connection(server) -> None:
    """Content-Length, chunked, empty (204) and error answers, large bodies both ways: all
    read whole, one after another on the same connection."""
    _, url = server
    client = HttpClient("key")
    assert client.request("GET", f"{url}/small") == (200, b'{"ok":true}', "application/json")
    conn = client._pool()[("http", url.removeprefix("http://"))]
    assert isinstance(conn, PlainConnection) and conn.sock is not None
    local = conn.sock.getsockname()
    big = b'{"input": "' + b"y" * 3_000_000 + b'"}'
    for _ in range(3):
        assert client.request("POST", f"{url}/echo", big) == (200, big, "application/json")
        assert client.request("GET", f"{url}/streamed") == (200, b"part0;part1;part2;",
                                                              "text/plain; charset=utf-8")
        assert client.request("GET", f"{url}/empty") == (204, b"", "")
        status, body, _ = client.request("GET", f"{url}/missing")
        assert (status, body) == (404, b"Not Found")
    assert client._pool()[("http", url.removeprefix("http://"))] is conn
    assert conn.sock is not None and conn.sock.getsockname() == local


def test_the_worker_sdk_opens_a_new_connection_after_the_server_closes_one(server) -> None:
    _, url = server
    client = HttpClient("key")
    key = ("http", url.removeprefix("http://"))
    assert client.request("GET", f"{url}/closing") == (200, b"bye", "text/plain; charset=utf-8")
    assert key not in client._pool()  # the answer said it closes: not kept
    assert client.request("GET", f"{url}/small")[0] == 200
    assert client._pool()[key].sock is not None


def _raw_server(answers: list[bytes]) -> tuple[str, list[bytes], threading.Semaphore]:
    """A server on a real socket that reads one request per connection, writes the next of
    `answers` and closes; returns its URL, the requests it got, and a semaphore released
    after each close."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []
    closed = threading.Semaphore(0)

    def serve() -> None:
        with listener:
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    got.append(data)
                    conn.sendall(answer)
                closed.release()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", got, closed


def test_the_worker_sdk_retries_once_on_a_kept_connection_the_server_dropped() -> None:
    """The server answers as if keeping the connection, then closes it: the next request
    meets a closed connection and goes again on a new one."""
    keep = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    url, got, closed = _raw_server([keep, keep])
    client = HttpClient("key")
    assert client.request("GET", f"{url}/a") == (200, b"{}", "application/json")
    assert closed.acquire(timeout=10)  # the server has closed its end of the kept connection
    assert client.request("GET", f"{url}/b") == (200, b"{}", "application/json")
    assert [r.split(b" ")[1] for r in got] == [b"/a", b"/b"]
    assert b"Authorization: key\r\n" in got[0] and b"Host: 127.0.0.1:" in got[0]


def test_the_worker_sdk_reads_an_old_style_answer_to_the_close_and_refuses_garbage() -> None:
    url, _, _ = _raw_server([b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
                          b"SPDY/9 nonsense\r\n\r\n", b"SPDY/9 nonsense\r\n\r\n"])
    client = HttpClient("key")
    assert client.request("GET", f"{url}/old") == (200, b"until the end", "text/plain")
    with pytest.raises(http.client.BadStatusLine):
        client.request("GET", f"{url}/bad")
    with pytest.raises(http.client.InvalidURL):
        client.request("GET", f"{url}/a b")
