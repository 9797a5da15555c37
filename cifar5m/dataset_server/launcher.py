"""Starting ``cifar5m serve`` in a child process on 127.0.0.1 and waiting until it answers:
for the demo, the benchmarks and the tests that need a real server process."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``url`` answers 200 (a loaded 2-core box can take a while to start a server);
    ``proc`` is terminated and RuntimeError raised if it dies or the time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the server behind {url} did not start")
