"""Runs a worker command as a child and leads its process group (stdlib only, started with
`python -I -S` so it costs a few ms).

Why: the agent's death signal (PR_SET_PDEATHSIG) reaches only its direct child. This
leader gets SIGTERM when the agent dies and then kills the whole group, so nothing the
worker started (e.g. the RunPod SDK's heartbeat process) outlives a SIGKILLed agent.
While the agent lives, a SIGTERM sent to the group is the agent's graceful stop: the
leader lets the worker handle it and exits with the worker's status.
"""

import os
import signal
import sys


def main() -> None:
    agent_pid = int(sys.argv[1])
    argv = sys.argv[2:]

    def on_term(signum, frame):
        if os.getppid() != agent_pid:  # the agent is gone: take the group down
            os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != agent_pid:
        sys.exit(1)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, os.environ)
        except OSError as exc:
            sys.stderr.write(f"cannot run {argv[0]!r}: {exc}\n")
            os._exit(127)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these have no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
