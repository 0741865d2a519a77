"""chatproject.writethrough keeps Twisted's byte stream intact: no loss, no reordering.

A real Twisted TCP server (select reactor, in a subprocess so the global reactor is
fresh) writes a known byte pattern in many writes of mixed sizes (small frames and
frames larger than the kernel's socket buffer) to a client that reads slowly at first
(so the socket buffer fills and writes fall back to Twisted's buffer, then go through
again once it drains), then calls loseConnection while bytes are still buffered. The
client must receive exactly the concatenation, in order, then EOF.
"""

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SERVER = textwrap.dedent(
    """
    import sys
    from twisted.internet import protocol, reactor
    from chatproject import writethrough
    assert writethrough.install()
    from twisted.internet import tcp
    calls = {"through": 0}

    def chunks():
        # Deterministic sizes: small frames, two 300 KiB ones (> socket buffer); 1.3 MB
        # in all through a 4 KiB receive buffer (about 30 s per run).
        for i in range(3000):
            size = 300 * 1024 if i % 1500 == 7 else 20 + (i * 37) % 400
            yield bytes([(i + k) % 251 for k in range(min(size, 251))]) * (size // 251 + 1)

    class P(protocol.Protocol):
        def connectionMade(self):
            for data in chunks():
                self.transport.write(data)
            self.transport.loseConnection()  # with bytes still buffered
        def connectionLost(self, reason):
            reactor.callLater(0, reactor.stop)

    f = protocol.ServerFactory(); f.protocol = P
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)


def expected() -> bytes:
    """The server's byte stream (same generator as SERVER)."""
    out = []
    for i in range(3000):
        size = 300 * 1024 if i % 1500 == 7 else 20 + (i * 37) % 400
        out.append(bytes([(i + k) % 251 for k in range(min(size, 251))]) * (size // 251 + 1))
    return b"".join(out)


@pytest.mark.parametrize("slow_start", [0.0, 1.0])
def test_write_through_loses_and_reorders_nothing(slow_start):
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # A server that stops sending fails the test instead of hanging the suite.
        client.settimeout(120)
        time.sleep(slow_start)  # the reader stalls: the server's socket buffer fills
        got = bytearray()
        while True:
            data = client.recv(65536)
            if not data:
                break
            got += data
        client.close()
        want = expected()
        assert len(got) == len(want)
        assert bytes(got) == want
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
