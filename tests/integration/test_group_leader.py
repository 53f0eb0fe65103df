"""The process runtime's group leader ends the way its worker ended, so the agent reports the
worker's real exit: a worker SIGKILLed on its own (the chaos campaign kills workers, not their
leaders) is "exited with code -9", not a traceback and code 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import runplane_node_agent.runtimes.process as process_runtime
from runplane_testing.waiting import wait_until

LEADER = str(Path(process_runtime.__file__).with_name("group_leader.py"))


def _leader(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", "-S", LEADER, str(os.getpid()), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _child_of(pid: int) -> int:
    def find() -> int | None:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None

    return wait_until(find, timeout_s=10, what="the worker started")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_signalled_worker_ends_its_leader_with_the_same_signal(sig):
    leader = _leader("sleep", "60")
    os.kill(_child_of(leader.pid), sig)
    _, err = leader.communicate(timeout=10)
    assert leader.returncode == -sig, err.decode()
    assert b"Traceback" not in err


def test_an_exit_code_is_passed_on():
    leader = _leader(sys.executable, "-c", "raise SystemExit(3)")
    assert leader.wait(10) == 3
