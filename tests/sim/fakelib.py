"""Builds the fake libnvidia-ml.so.1 from tests/fakenvml/fakenvml.c with the system C compiler."""

from __future__ import annotations

import subprocess
from pathlib import Path

FAKE_NVML_DIR = Path(__file__).resolve().parent.parent / "fakenvml"
FAKE_NVML = FAKE_NVML_DIR / "libnvidia-ml.so.1"


def build_fake_nvml() -> Path:
    """The library's path, compiled first if missing or older than its source."""
    source = FAKE_NVML_DIR / "fakenvml.c"
    if not FAKE_NVML.exists() or FAKE_NVML.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            [
                "cc",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-shared",
                "-fPIC",
                "-Wl,-soname,libnvidia-ml.so.1",
                "-o",
                str(FAKE_NVML),
                str(source),
                "-lpthread",
            ],
            check=True,
        )
    return FAKE_NVML
