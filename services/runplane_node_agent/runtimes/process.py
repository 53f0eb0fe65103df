"""The process runtime: each worker is a local subprocess in its own session.

Each worker runs under a small group leader (group_leader.py) that dies with the agent
(PR_SET_PDEATHSIG) and then kills the whole group; everything a worker started is
killed with it (the whole process group), so no orphan keeps pinging a dead worker id.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from runplane_node_agent.runtimes.base import (
    Capability,
    Launch,
    OutputSink,
    RunningWorker,
    Runtime,
    RuntimeFailure,
)

_PR_SET_PDEATHSIG = 1
_LINE_LIMIT_BYTES = 1024 * 1024


_GROUP_LEADER = str(Path(__file__).with_name("group_leader.py"))


def _die_with_parent(parent_pid: int):
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:  # runs in the child between fork and exec
        # SIGTERM, not SIGKILL: the group leader then kills everything the worker started.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(1)

    return preexec


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells us the moment the process exits. (`Process.wait()` also waits for its pipes
    to close, which a grandchild holding them can delay forever.)"""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class ProcessWorker(RunningWorker):
    def __init__(self, worker_id: str, transport: asyncio.SubprocessTransport, protocol: _Protocol) -> None:
        self.worker_id = worker_id
        self.pid = transport.get_pid()
        self._transport = transport
        self._protocol = protocol
        self._pumps: list[asyncio.Task[None]] = []

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode()

    async def wait(self) -> int:
        await self._protocol.exited
        code = self._transport.get_returncode()
        code = -1 if code is None else code
        # The leader is gone; take down whatever it left behind (e.g. a heartbeat process).
        self._signal_group(signal.SIGKILL)
        self._transport.close()
        return code

    async def stop(self, grace_s: float) -> int:
        if self.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                return await asyncio.wait_for(asyncio.shield(self.wait()), grace_s)
            except TimeoutError:
                pass
        self._signal_group(signal.SIGKILL)
        return await self.wait()

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    def pause(self) -> None:
        # The whole group at once, then the leader alone thawed: it only waits for the worker,
        # and must stay able to take the group down should the agent die meanwhile.
        self._signal_group(signal.SIGSTOP)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGCONT)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)


def _runnable(program: str, env: dict[str, str]) -> bool:
    if "/" in program:
        return os.access(program, os.X_OK)
    import shutil

    return shutil.which(program, path=env.get("PATH", os.defpath)) is not None


class ProcessRuntime(Runtime):
    name = "process"
    capabilities = frozenset({Capability.PAUSE, Capability.GPU})

    async def start(self, launch: Launch, output: OutputSink) -> RunningWorker:
        if not launch.argv:
            raise RuntimeFailure("the endpoint has no command to run")
        loop = asyncio.get_running_loop()
        if not _runnable(launch.argv[0], launch.env):
            raise RuntimeFailure(f"cannot run {launch.argv[0]!r}: not found or not executable")
        argv = [sys.executable, "-I", "-S", _GROUP_LEADER, str(os.getpid()), *launch.argv]
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(_LINE_LIMIT_BYTES, loop), *argv, env=launch.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as exc:
            raise RuntimeFailure(f"cannot run {launch.argv[0]!r}: {exc}") from exc
        worker = ProcessWorker(launch.worker_id, transport, protocol)
        assert protocol.stdout is not None and protocol.stderr is not None
        worker._pumps = [
            asyncio.ensure_future(_pump(protocol.stdout, "stdout", output)),
            asyncio.ensure_future(_pump(protocol.stderr, "stderr", output)),
        ]
        return worker

    async def pause(self, worker: RunningWorker) -> None:
        """SIGSTOP to the whole group: the worker and all it started (e.g. the RunPod SDK's
        heartbeat process); the group leader alone is let go on at once."""
        assert isinstance(worker, ProcessWorker)
        worker.pause()

    async def resume(self, worker: RunningWorker) -> None:
        assert isinstance(worker, ProcessWorker)
        worker.resume()

    async def memory_mb(self, worker: RunningWorker) -> int | None:
        """Memory of the worker's whole process group: the sum of each process's proportional
        share (PSS: pages a forked helper shares with the worker count once), else its RSS."""
        assert isinstance(worker, ProcessWorker)
        if worker.pid is None:
            return None
        members = await asyncio.to_thread(group_members, worker.pid)
        if not members:
            return None
        total = await asyncio.to_thread(lambda: sum(_pss_bytes(pid) or rss for pid, _, rss in members))
        return round(total / (1024 * 1024))


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def group_members(pgid: int) -> list[tuple[int, str, int]]:
    """(pid, state letter, resident bytes) of every process in the group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid:
            members.append((int(entry.name), fields[0].decode(), int(fields[21]) * _PAGE_BYTES))
    return members


async def _pump(reader: asyncio.StreamReader, stream: str, output: OutputSink) -> None:
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                output(stream, exc.partial.decode(errors="replace").rstrip("\r\n"))
            return
        except asyncio.LimitOverrunError as exc:
            line = await reader.read(exc.consumed)
        except Exception:
            return
        output(stream, line.decode(errors="replace").rstrip("\r\n"))
