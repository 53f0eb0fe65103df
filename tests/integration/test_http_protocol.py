"""One write per HTTP message on the job path: our servers' answers
(runplane_service.http_protocol) and the worker SDK's requests (runplane_worker.transport).

A real uvicorn server in its own process, real clients over keep-alive connections; write
syscalls are counted by the kernel (/proc/<pid>/io `syscw`). uvicorn as it comes writes an
answer's head and body apart, and so does http.client a request's: two writes per message."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from runplane_testing.natsserver import free_port, wait_port
from runplane_worker.transport import OneSendConnection

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

    async def main(stack, stop):
        app = Starlette(routes=[Route("/small", small), Route("/streamed", streamed),
                                   Route("/echo", echo, methods=["POST"])])
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
    for connection, messages in ((OneSendConnection, 1), (http.client.HTTPConnection, 2)):
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, peer:
            conn = connection("agent.test")
            conn.sock = ours
            conn.request("POST", "/v2/ep/job-done/w/j?isStream=false", body=body,
                         headers={"Authorization": "key", "Content-Type": "application/json"})
            peer.setblocking(False)
            sent = []
            while True:
                try:
                    sent.append(peer.recv(1 << 16))
                except BlockingIOError:
                    break
        assert len(sent) == messages, (connection, sent)
        head, _, rest = b"".join(sent).partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v2/ep/job-done/w/j?isStream=false HTTP/1.1\r\n")
        assert b"Content-Length: %d" % len(body) in head and rest == body
