"""Finds the pod UID and container id in the text of ``/proc/<pid>/cgroup``.

Formats handled (each seen in kubelet, containerd, CRI-O, Docker and systemd documentation):
cgroup v1 (one line per controller) and v2 (``0::``); the cgroupfs driver
(``/kubepods/burstable/pod<uid>/<id>``) and the systemd driver
(``kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope``); all three QoS
classes (Guaranteed pods have no QoS level); containerd, CRI-O (``crio-<id>.scope``, skipping
``crio-conmon-``) and Docker / cri-dockerd (``docker-<id>.scope``); static pods (32-hex UIDs);
and paths relative to a private cgroup namespace (``0::/../../…``). Pure functions.
"""

from __future__ import annotations

import re

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# A path segment naming a pod: "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid>.slice" (systemd).
_POD_SEGMENT = re.compile(rf"^(?:kubepods(?:-besteffort|-burstable)?-)?pod({_UID})(?:\.slice)?$")
# The container segment below it; the conmon monitor of CRI-O is not the container.
_CONTAINER_SEGMENT = re.compile(r"^(?:(?:cri-containerd|crio|docker|cri-dockerd)-)?([0-9a-f]{64})(?:\.scope)?$")


def parse_cgroup(text: str) -> tuple[str, str | None] | None:
    """Returns (pod uid, container id or None), or None when no line names a pod."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        segments = [s for s in parts[2].split("/") if s not in ("", ".", "..")]
        for position, segment in enumerate(segments):
            pod = _POD_SEGMENT.match(segment)
            if not pod:
                continue
            uid = pod.group(1).replace("_", "-")
            container = None
            if position + 1 < len(segments):
                found = _CONTAINER_SEGMENT.match(segments[position + 1])
                container = found.group(1) if found else None
            return uid, container
    return None
