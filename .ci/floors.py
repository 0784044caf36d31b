"""Print a pip constraints file pinning every dependency to the floor setup.cfg declares.

setup.cfg stays the one place versions are written: each ``name>=version`` in install_requires
and in the extras becomes ``name==version``; requirements without a floor are left free.
Used by .ci/run's minimum-versions step:  python3 .ci/floors.py > constraints.txt
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def requirements(setup_cfg: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    if parser.has_section("options.extras_require"):
        for extra in parser["options.extras_require"].values():
            lines += extra.splitlines()
    return [line.strip() for line in lines if line.strip()]


def floors(setup_cfg: Path) -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in requirements(setup_cfg):
        match = FLOOR.match(line)
        if match is None:
            continue
        name, version = match[1].lower().replace("_", "-"), match[2]
        if pinned.setdefault(name, version) != version:
            sys.exit(f"setup.cfg declares two floors for {name}: {pinned[name]} and {version}")
    return pinned


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in floors(root / "setup.cfg").items():
        print(f"{name}=={version}")
