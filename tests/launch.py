"""``python -m tests.launch RESULT CMD...``: run CMD as a child of this small process and
write its rusage from ``wait4`` (CPU seconds, peak RSS) to RESULT as JSON; exit as it did.

A process forked from a large one carries that one's peak RSS into its own (exec keeps
the larger of the two), so a test worker grown to 400 MB by earlier tests would see
every child it starts "use" 400 MB. Started from here, a child's peak is its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    result, cmd = Path(sys.argv[1]), sys.argv[2:]
    proc = subprocess.Popen(cmd)  # stdin, stdout and stderr are ours
    _, status, usage = os.wait4(proc.pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    figures = {"user_s": usage.ru_utime, "sys_s": usage.ru_stime, "maxrss_kb": usage.ru_maxrss}
    result.write_text(json.dumps({"cpu_s": cpu, **figures}))
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # ended by a signal: end by the same one, so our parent sees it too
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
