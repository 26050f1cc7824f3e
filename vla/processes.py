"""Worker processes that do not outlive their parent.

Generators and evaluations run simulators in spawned worker processes. When the parent is killed with SIGKILL (a
pipeline timeout, the OOM killer), nothing tells its workers: they would keep simulating as orphans, holding
gigabytes of memory and both cores. Each worker therefore starts `exit_with_parent()` first.
"""

from __future__ import annotations

import os
import threading
import time


def _watch(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def exit_with_parent(poll_s: float = 2.0) -> None:
    """Start a daemon thread that ends this process (even mid-episode) once its parent process is gone."""
    threading.Thread(target=_watch, args=(os.getppid(), poll_s), daemon=True, name="exit-with-parent").start()
