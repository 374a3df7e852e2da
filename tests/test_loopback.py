"""warehouse/loopback.py: the free port and the wait the tests' servers start with."""
import subprocess
import sys

from warehouse.loopback import free_port, listening


def test_listening_says_when_the_server_accepts_connections():
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert listening(port, server, seconds=30)
    finally:
        server.terminate()
        server.wait()


def test_listening_gives_up_when_the_process_exits():
    port = free_port()
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert not listening(port, exited, seconds=30)
