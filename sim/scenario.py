"""Scenarios for the fake libnvidia-ml.so.1 (sim/fakenvml/fakenvml.c): GPUs, MIG devices,
processes, Xid events and faults, written atomically so the library, which re-reads the file
whenever it changes, never sees half of one."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
NVML_ERROR_DRIVER_NOT_LOADED = 9
# Models with GPM (Hopper and newer): a Gpu's ``gpm`` defaults to whether its name is one of these.
GPM_MODELS = ("H100", "H200", "H800", "GH200", "B100", "B200", "GB200")


def _text(value: str | bytes) -> str:
    """A name or UUID for the file: bytes that are no printable ASCII (and ``%``) as %XX escapes."""
    raw = value.encode() if isinstance(value, str) else value
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x25 else f"%{b:02X}" for b in raw)


@dataclass
class Gpu:
    uuid: str
    name: str | bytes = "NVIDIA H100 80GB HBM3"  # bytes: what NVML returns, UTF-8 or not
    minor: int | None = None  # defaults to the GPU's index
    util: int = 0
    memutil: int = 0
    total: int = 80 * GIB
    used: int = 0
    reserved: int = 0
    temp: int = 40
    power: int = 100_000
    mig: bool = False
    sm_clock: int = 1980  # MHz
    mem_clock: int = 2619  # MHz
    energy: int = 0  # mJ since the driver loaded
    energy_rate: int = 0  # mW: the counter grows at this rate from energy_since (0: it stays at energy)
    energy_since: float = 0.0  # Unix time at which the counter read energy
    energy_until: float = 0.0  # Unix time at which it stops growing (0: never)
    power_limit: int = 700_000  # mW
    encoder: int = 0  # percent
    decoder: int = 0
    pcie_tx: int = 0  # KB/s
    pcie_rx: int = 0
    pcie_replays: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    remapped_correctable: int = 0
    remapped_uncorrectable: int = 0
    remap_pending: bool = False
    remap_failed: bool = False
    clock_reasons: int = 0  # nvmlClocksEventReason bitmask
    recovery_action: int = 0  # nvmlDeviceGpuRecoveryAction_t, where the driver offers the field
    pci_bus_id: str | None = None  # None: a bus id of its own from its index (pci_bus_id())
    memory_temp: int | None = None  # HBM temperature, C; None: no HBM (the field is not supported)
    gpm: bool | None = None  # None: as the model (GPM_MODELS)
    sm_active: float = 0.0  # GPM percentages
    sm_occupancy: float = 0.0
    tensor_active: float = 0.0
    dram_bandwidth: float = 0.0
    lost: bool = False
    unsupported: tuple[str, ...] = ()
    fail: dict[str, int] = field(default_factory=dict)
    block: dict[str, float] = field(default_factory=dict)  # call -> seconds

    def energy_at(self, when: float) -> int:
        """The energy counter, in mJ, at Unix time ``when``, as the fake library computes it."""
        if self.energy_until:
            when = min(when, self.energy_until)
        return self.energy + int(self.energy_rate * max(0.0, when - self.energy_since))

    def draw(self, milliwatts: int, when: float | None = None) -> None:
        """From ``when`` (now by default), the counter grows at ``milliwatts``, continuing from where it is."""
        when = time.time() if when is None else when
        self.energy, self.energy_since, self.energy_rate = self.energy_at(when), when, milliwatts
        self.energy_until = 0.0

    def reset_energy(self) -> None:
        """The counter starts again from 0 now, as after a driver reload."""
        self.energy, self.energy_since = 0, time.time()


@dataclass
class Mig:
    parent: int
    uuid: str
    gi: int
    name: str | bytes = "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    ci: int = 0
    total: int = 5 * GIB
    used: int = 0
    sm_active: float = 0.0  # GPM percentages
    sm_occupancy: float = 0.0
    tensor_active: float = 0.0
    dram_bandwidth: float = 0.0


@dataclass
class Proc:
    gpu: int
    pid: int
    mem: int | None = 0  # None: NVML reports "not available"
    sm: int = 0
    gi: int | None = None
    ci: int | None = None


@dataclass
class Xid:
    """An Xid critical error event. Append only: an event's sequence number is its place in the list."""

    gpu: int
    code: int
    gi: int | None = None  # the GPU instance of a MIG device it happened on
    ci: int | None = None


@dataclass
class Scenario:
    gpus: list[Gpu] = field(default_factory=list)
    migs: list[Mig] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    xids: list[Xid] = field(default_factory=list)
    init_rc: int = 0
    driver_version: str = "550.54.15"
    count_block_s: float = 0.0  # nvmlDeviceGetCount hangs this long: the poll itself stalls
    recovery_field: bool = False  # the driver offers the GPU recovery action field (newer drivers)
    instant_timeout: bool = False  # nvmlEventSetWait returns TIMEOUT at once (a broken driver)

    def render(self) -> str:
        lines = [
            f"driver\tinit={self.init_rc}\tversion={self.driver_version}\tcountblock={round(self.count_block_s * 1000)}"
            f"\trecoveryfield={int(self.recovery_field)}\tinstanttimeout={int(self.instant_timeout)}"
        ]
        for index, gpu in enumerate(self.gpus):
            gpm = gpu.gpm if gpu.gpm is not None else any(m in str(gpu.name) for m in GPM_MODELS)
            fields = {
                "uuid": _text(gpu.uuid),
                "name": _text(gpu.name),
                "pcibus": gpu.pci_bus_id or pci_bus_id(index),
                "minor": gpu.minor if gpu.minor is not None else index,
                "util": gpu.util,
                "memutil": gpu.memutil,
                "total": gpu.total,
                "used": gpu.used,
                "reserved": gpu.reserved,
                "temp": gpu.temp,
                "power": gpu.power,
                "mig": int(gpu.mig),
                "smclock": gpu.sm_clock,
                "memclock": gpu.mem_clock,
                "energy": gpu.energy,
                "energyrate": gpu.energy_rate,
                "energysince": repr(gpu.energy_since),
                "energyuntil": repr(gpu.energy_until),
                "plimit": gpu.power_limit,
                "enc": gpu.encoder,
                "dec": gpu.decoder,
                "pcietx": gpu.pcie_tx,
                "pcierx": gpu.pcie_rx,
                "replay": gpu.pcie_replays,
                "ecccorr": gpu.ecc_corrected,
                "eccunc": gpu.ecc_uncorrected,
                "remapcorr": gpu.remapped_correctable,
                "remapunc": gpu.remapped_uncorrectable,
                "remappending": int(gpu.remap_pending),
                "remapfailed": int(gpu.remap_failed),
                "reasons": gpu.clock_reasons,
                "recovery": gpu.recovery_action,
                "memtemp": -1 if gpu.memory_temp is None else gpu.memory_temp,
                "gpm": int(gpm),
                "smactive": gpu.sm_active,
                "smocc": gpu.sm_occupancy,
                "tensor": gpu.tensor_active,
                "dram": gpu.dram_bandwidth,
                "lost": int(gpu.lost),
            }
            if gpu.unsupported:
                fields["unsupported"] = ",".join(gpu.unsupported)
            if gpu.fail:
                fields["fail"] = ",".join(f"{call}:{rc}" for call, rc in gpu.fail.items())
            if gpu.block:
                fields["block"] = ",".join(f"{call}:{round(s * 1000)}" for call, s in gpu.block.items())
            lines.append("gpu\t" + "\t".join(f"{k}={v}" for k, v in fields.items()))
        for mig in self.migs:
            lines.append(
                f"mig\tparent={mig.parent}\tuuid={_text(mig.uuid)}\tname={_text(mig.name)}\tgi={mig.gi}\tci={mig.ci}"
                f"\ttotal={mig.total}\tused={mig.used}\tsmactive={mig.sm_active}\tsmocc={mig.sm_occupancy}"
                f"\ttensor={mig.tensor_active}\tdram={mig.dram_bandwidth}"
            )
        for proc in self.procs:
            line = f"proc\tgpu={proc.gpu}\tpid={proc.pid}\tmem={'na' if proc.mem is None else proc.mem}\tsm={proc.sm}"
            if proc.gi is not None:
                line += f"\tgi={proc.gi}\tci={proc.ci if proc.ci is not None else 0}"
            lines.append(line)
        for seq, xid in enumerate(self.xids, start=1):
            line = f"xid\tgpu={xid.gpu}\tcode={xid.code}\tseq={seq}"
            if xid.gi is not None:
                line += f"\tgi={xid.gi}\tci={xid.ci if xid.ci is not None else 0}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(self.render())
        os.replace(temporary, target)


def pci_bus_id(index: int) -> str:
    """A GPU's PCI bus id as NVML writes it (an 8-digit domain), a bus of its own per index."""
    return f"00000000:{(0x18 + 0x13 * index) % 0x100:02X}:00.0"


def gpu_uuid(n: int) -> str:
    return f"GPU-{n:08x}-1111-2222-3333-444455556666"


def mig_uuid(n: int) -> str:
    return f"MIG-{n:08x}-aaaa-bbbb-cccc-ddddeeeeffff"
