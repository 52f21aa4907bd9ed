"""Peak RSS, wall and CPU time of one command, for the memory benchmarks (big_model.py, merge_memory.py).

The command runs under a fresh wrapper process, so getrusage(RUSAGE_CHILDREN) in the wrapper holds that command
alone (ru_maxrss: the largest resident set of any child, not a sum). No address-space limit is set: torch's
libraries reserve far more virtual memory than they touch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "out = open(sys.argv[1], 'w') if sys.argv[1] else subprocess.DEVNULL; "
    "rc = subprocess.run(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT if sys.argv[1] else None).returncode; "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(u.ru_maxrss, time.perf_counter() - t, u.ru_utime + u.ru_stime, rc)"
)


def measure(command: list[str], log: Path | None = None) -> dict[str, float]:
    """{peak_rss_mib, wall_s, cpu_s (user + sys), rc} of `command`; its output goes to `log` (stdout and stderr),
    or stdout is dropped and stderr passes through without one."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(log) if log else "", *command], capture_output=True, text=True, check=True
    )
    kib, wall, cpu, rc = out.stdout.split()
    return {"peak_rss_mib": int(kib) / 1024, "wall_s": float(wall), "cpu_s": float(cpu), "rc": int(rc)}
