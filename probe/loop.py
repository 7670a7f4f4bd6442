"""The event loop of `probe run`: uvloop when it is installed, else asyncio's own."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop (PROBE_LOOP=asyncio forces the standard loop)."""
    if os.environ.get("PROBE_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: the standard loop does the same work
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
