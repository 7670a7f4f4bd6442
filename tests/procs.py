"""A real `probe run` process for tests: started on an ephemeral port, its log collected, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class ProbeProcess:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    base: str = ""

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_log(self, text: str, after: int = 0, timeout: float = 15.0) -> None:
        """Wait until a log line after the first `after` lines contains `text`."""
        await wait_until(lambda: _async(any(text in line for line in self.lines[after:])), timeout)


async def _async(value: bool) -> bool:
    return value


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def probe_run(
    *args: str, env: dict[str, str] | None = None, log_level: str = "info", max_fds: int | None = None
) -> AsyncIterator[ProbeProcess]:
    """Start `probe run --listen 127.0.0.1:0 ARGS...` (with at most `max_fds` open files); yield once it listens."""
    environment = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"} | (env or {})

    def limit_fds() -> None:
        if max_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "probe", "--log-level", log_level, "run", "--listen", "127.0.0.1:0", *args,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=environment,
        preexec_fn=limit_fds if max_fds is not None else None,
    )
    running = ProbeProcess(proc)
    assert proc.stderr is not None
    stderr = proc.stderr

    async def read() -> None:
        while line := await stderr.readline():
            running.lines.append(line.decode(errors="replace").rstrip())

    reader = asyncio.create_task(read())
    try:
        async def listening() -> bool:
            assert proc.returncode is None, running.log
            return re.search(r"listening on (https?://127\.0\.0\.1:\d+)", running.log) is not None

        await wait_until(listening)
        found = re.search(r"listening on (https?://127\.0\.0\.1:\d+)", running.log)
        assert found is not None
        running.base = found.group(1)
        yield running
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0, running.log
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
