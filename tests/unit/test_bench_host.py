"""bench/host.py: CPU burnt by the benchmark's own (waited-for) processes is not counted as
another's; CPU burnt by a process the benchmark did not wait for is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.host import HostShare
from runplane_testing.waiting import wait_until

BURN_S = 1.0
# Burns BURN_S of CPU, then creates the file named by its first argument (if any).
_BURN = (f"import sys, time\nend = time.process_time() + {BURN_S}\n"
         "while time.process_time() < end: pass\n"
         "if len(sys.argv) > 1: open(sys.argv[1], 'w').close()\n")


def _one_core_pct() -> float:
    return 100 / (os.cpu_count() or 1)


def test_a_waited_child_is_the_benchmarks_own() -> None:
    with HostShare() as host:
        subprocess.run([sys.executable, "-c", _BURN], check=True)
    # About one core busy for the whole block, all of it ours.
    assert host.other_pct < 0.5 * _one_core_pct(), host.other_pct


def test_a_process_left_to_others_counts_as_other(tmp_path: Path) -> None:
    # The shell starts the burner in the background and exits: the burner is re-parented
    # away from this process, which never waits for it. The block ends when it has burnt.
    done = tmp_path / "burnt"
    with HostShare() as host:
        subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" "$1" > /dev/null 2>&1 &', _BURN, str(done)],
                       check=True)
        wait_until(done.exists, timeout_s=30, what="the burner's end")
    assert host.other_pct > 0.4 * _one_core_pct(), host.other_pct
