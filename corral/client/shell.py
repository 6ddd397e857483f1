"""`corral shell`: an interactive shell on one connection (being written)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run_shell(args: argparse.Namespace, connect_args: dict[str, Any]) -> int:
    """Run the interactive shell until exit or EOF; return the exit status."""
    sys.stderr.write("corral: error: the shell is not built yet\n")
    return 1
