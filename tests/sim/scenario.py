"""Scenarios for the fake libnvidia-ml.so.1 (tests/fakenvml/fakenvml.c): GPUs, MIG devices,
processes and faults, written atomically so the library, which re-reads the file whenever it
changes, never sees half of one."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
NVML_ERROR_DRIVER_NOT_LOADED = 9


@dataclass
class Gpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    minor: int | None = None  # defaults to the GPU's index
    util: int = 0
    memutil: int = 0
    total: int = 80 * GIB
    used: int = 0
    reserved: int = 0
    temp: int = 40
    power: int = 100_000
    mig: bool = False
    lost: bool = False
    unsupported: tuple[str, ...] = ()
    fail: dict[str, int] = field(default_factory=dict)
    block: dict[str, int] = field(default_factory=dict)  # call -> seconds


@dataclass
class Mig:
    parent: int
    uuid: str
    gi: int
    name: str = "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    ci: int = 0
    total: int = 5 * GIB
    used: int = 0


@dataclass
class Proc:
    gpu: int
    pid: int
    mem: int | None = 0  # None: NVML reports "not available"
    sm: int = 0
    gi: int | None = None
    ci: int | None = None


@dataclass
class Scenario:
    gpus: list[Gpu] = field(default_factory=list)
    migs: list[Mig] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    init_rc: int = 0
    driver_version: str = "550.54.15"

    def render(self) -> str:
        lines = [f"driver\tinit={self.init_rc}\tversion={self.driver_version}"]
        for index, gpu in enumerate(self.gpus):
            fields = {
                "uuid": gpu.uuid,
                "name": gpu.name,
                "minor": gpu.minor if gpu.minor is not None else index,
                "util": gpu.util,
                "memutil": gpu.memutil,
                "total": gpu.total,
                "used": gpu.used,
                "reserved": gpu.reserved,
                "temp": gpu.temp,
                "power": gpu.power,
                "mig": int(gpu.mig),
                "lost": int(gpu.lost),
            }
            if gpu.unsupported:
                fields["unsupported"] = ",".join(gpu.unsupported)
            if gpu.fail:
                fields["fail"] = ",".join(f"{call}:{rc}" for call, rc in gpu.fail.items())
            if gpu.block:
                fields["block"] = ",".join(f"{call}:{s}" for call, s in gpu.block.items())
            lines.append("gpu\t" + "\t".join(f"{k}={v}" for k, v in fields.items()))
        for mig in self.migs:
            lines.append(
                f"mig\tparent={mig.parent}\tuuid={mig.uuid}\tname={mig.name}\tgi={mig.gi}\tci={mig.ci}"
                f"\ttotal={mig.total}\tused={mig.used}"
            )
        for proc in self.procs:
            line = f"proc\tgpu={proc.gpu}\tpid={proc.pid}\tmem={'na' if proc.mem is None else proc.mem}\tsm={proc.sm}"
            if proc.gi is not None:
                line += f"\tgi={proc.gi}\tci={proc.ci if proc.ci is not None else 0}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(self.render())
        os.replace(temporary, target)


def gpu_uuid(n: int) -> str:
    return f"GPU-{n:08x}-1111-2222-3333-444455556666"


def mig_uuid(n: int) -> str:
    return f"MIG-{n:08x}-aaaa-bbbb-cccc-ddddeeeeffff"
