"""What the test harness does with a process it started: kill, stop, liveness, its log."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


class OwnedProcess:
    """Mixed into a harness class that sets `proc` (its Popen, or None) and `log_path`."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 10) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
