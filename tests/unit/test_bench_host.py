"""bench/host.py: CPU burnt by the benchmark's own (waited-for) processes is not counted as
another's; CPU burnt by a process the benchmark did not wait for is."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.host import HostShare

BURN_S = 1.0
_BURN = f"import time\nend = time.process_time() + {BURN_S}\nwhile time.process_time() < end: pass\n"


def _one_core_pct() -> float:
    return 100 / (os.cpu_count() or 1)


def test_a_waited_child_is_the_benchmarks_own() -> None:
    with HostShare() as host:
        subprocess.run([sys.executable, "-c", _BURN], check=True)
    # About one core busy for the whole block, all of it ours.
    assert host.other_pct < 0.5 * _one_core_pct(), host.other_pct
    assert host.steal_pct >= 0


def test_a_process_left_to_others_counts_as_other() -> None:
    # The shell starts the burner in the background and exits: the burner is re-parented
    # away from this process, which never waits for it.
    with HostShare() as host:
        subprocess.run(["sh", "-c", f'"{sys.executable}" -c "$0" > /dev/null 2>&1 &', _BURN], check=True)
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
    assert host.other_pct > 0.4 * _one_core_pct(), host.other_pct
