"""Reading GPU processes' owners from a /proc tree."""

from pathlib import Path

from exporter.model import ProcessOwner
from exporter.sources.procfs import ProcReader
from sim.procfs import HOST_PROCESS, FakeProc, cgroupfs_v1

UID = "5f1d2c3b-aaaa-4bbb-8ccc-0123456789ab"
CID = "c" * 64


def test_owners_of_pod_host_and_gone_processes(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.add(10, cgroupfs_v1(UID, CID))
    proc.add(11, HOST_PROCESS)
    assert ProcReader(str(tmp_path)).owners([10, 11, 12]) == {
        10: ProcessOwner(10, UID, CID),
        11: ProcessOwner(11, None, None),
        12: None,  # exited before we looked
    }


def test_a_pid_is_forgotten_once_it_leaves_the_list(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.add(10, cgroupfs_v1(UID, CID))
    reader = ProcReader(str(tmp_path))
    assert reader.owners([10])[10] == ProcessOwner(10, UID, CID)
    proc.remove(10)
    assert reader.owners([10])[10] == ProcessOwner(10, UID, CID)  # still listed: read once, remembered
    assert reader.owners([]) == {}
    proc.add(10, HOST_PROCESS)  # the number comes back as another process
    assert reader.owners([10])[10] == ProcessOwner(10, None, None)
