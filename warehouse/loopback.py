"""Servers the tests and benchmarks start on 127.0.0.1 (a moto S3 server, a Ray head): a free
port, and waiting until the server's process listens on it."""
from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int, process: subprocess.Popen, *, seconds: float, poll: float = 0.1) -> bool:
    """Wait until something accepts connections on 127.0.0.1:``port``; False if ``process`` exits or
    ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(poll)
