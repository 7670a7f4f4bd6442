"""`probe demo`: a simulated border on loopback and the monitor probing it.

STUB: the interference-lab work implements it.
"""

from __future__ import annotations

import argparse
import sys


def main(args: argparse.Namespace) -> int:
    """Run the demo until interrupted; return the exit status."""
    print("probe demo: not built yet", file=sys.stderr)
    return 2
