"""The /proc edge: reads each GPU process's cgroup to find the pod and container it runs in.

NVML reports host PIDs, so ``proc_root`` is the host's /proc: the agent's own with ``hostPID``,
or the host's mounted elsewhere (``/host/proc``). Files are read directly rather than through
psutil, whose proc location is one process-wide global (``psutil.PROCFS_PATH``) and could not be
injected per reader as the tests need.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from exporter.model import ProcessOwner
from exporter.sources.cgroup import parse_cgroup


class ProcReader:
    """Reads owners, remembering each PID's while NVML keeps listing it.

    A process cannot change pod, so its cgroup is read once, not every poll. A PID is forgotten as
    soon as it is missing from a poll; for a stale answer its number would have to be reused by
    another GPU process within one poll interval, which takes the kernel cycling through pid_max.
    """

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = Path(proc_root)
        self._known: dict[int, ProcessOwner] = {}

    def owner(self, pid: int) -> ProcessOwner | None:
        """The cgroup owner of ``pid``; None when the process is gone (or its cgroup unreadable)."""
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
        except OSError:  # exited between NVML's list and this read, or not visible to us
            return None
        found = parse_cgroup(text)
        if found is None:
            return ProcessOwner(pid=pid, pod_uid=None, container_id=None)
        return ProcessOwner(pid=pid, pod_uid=found[0], container_id=found[1])

    def owners(self, pids: Iterable[int]) -> dict[int, ProcessOwner | None]:
        found: dict[int, ProcessOwner | None] = {}
        for pid in set(pids):
            owner = self._known.get(pid) or self.owner(pid)
            found[pid] = owner
        self._known = {pid: owner for pid, owner in found.items() if owner is not None}
        return found
