"""Builds the fake libnvidia-ml.so.1 from sim/fakenvml/fakenvml.c with the system C compiler.

An older driver lacks some symbols. pynvml looks each one up with ``getattr(CDLL, name)`` (dlsym)
and caches it per process, so a symbol cannot be taken away at run time; instead a variant of the
library is linked with a version script that makes the dropped symbols local: dlsym does not find
them, and pynvml raises FUNCTION_NOT_FOUND as it would on the old driver.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

FAKE_NVML_DIR = Path(__file__).resolve().parent / "fakenvml"
FAKE_NVML = FAKE_NVML_DIR / "libnvidia-ml.so.1"


def build_fake_nvml(without: Sequence[str] = (), directory: Path | None = None) -> Path:
    """The library's path, compiled first if missing or older than its source.

    ``without``: C symbols to leave out (an older driver), built into ``directory``.
    """
    if without and directory is None:
        raise ValueError("a library without some symbols needs its own directory")
    target = (directory / FAKE_NVML.name) if directory is not None else FAKE_NVML
    source = FAKE_NVML_DIR / "fakenvml.c"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime and not without:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    link = ["-Wl,-soname,libnvidia-ml.so.1"]
    if without:
        script = target.with_name("exports.map")
        script.write_text("{\n  global: *;\n  local: " + "; ".join(without) + ";\n};\n")
        link.append(f"-Wl,--version-script={script}")
    subprocess.run(
        [
            "cc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            *link,
            "-o",
            str(target),
            str(source),
            "-lpthread",
        ],
        check=True,
    )
    return target
