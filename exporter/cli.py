"""Argument errors, one way for the agent and the adapter: a bad setting is one line naming it and
exit code 2, never argparse's usage block or a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming what is wrong, exit code 2 (argparse's own prints the usage too)."""
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        raise SystemExit(2)
