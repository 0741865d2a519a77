"""Write-through for Twisted's TCP transport: send at once when nothing is buffered.

Twisted's ``FileDescriptor.write`` never sends: it appends the bytes to a buffer and
calls ``startWriting`` (on daphne's asyncio reactor, ``loop.add_writer``: an epoll
modify); the reactor later calls ``doWrite`` (one ``send``) and ``stopWriting``
(``loop.remove_writer``: another epoll modify). A streaming answer writes one small
websocket frame per delta to each tab, and nearly always the kernel's socket buffer has
room, so those two epoll calls and a loop iteration per frame are pure overhead.

:func:`install` replaces ``twisted.internet.tcp.Connection.write`` with one that, when
the transport has nothing buffered (and is not closing, not half-closed, not in
``startTLS`` mode), calls ``socket.send`` straight away. Whatever the kernel does not
take (a partial send, ``EAGAIN``) or any error goes to Twisted's own ``write``
unchanged, so ordering (nothing is buffered ahead of us, and once something is, every
later write is buffered behind it), back-pressure (the producer is paused by Twisted's
buffer accounting of what is left) and error handling (``doWrite`` sees the error and
drops the connection) stay Twisted's.

Installed by ``chatproject/asgi.py`` when the worker imports the application, not in
daphne: daphne never touches the socket (the transport is Twisted's), and patching our
own worker keeps the dependency pinned and unforked. ``CHAT_WRITE_THROUGH=0`` leaves
Twisted untouched (for A/B measurements).
"""

from __future__ import annotations

import os
from errno import EAGAIN, EINTR, EWOULDBLOCK

_original_write = None


def _write_through(self, data: bytes) -> None:
    """``tcp.Connection.write``: ``send`` now if nothing is queued, else Twisted's."""
    if (
        self.TLS
        or self._tempDataLen
        or self.offset != len(self.dataBuffer)
        or self.disconnecting
        or self._writeDisconnecting
        or not self.connected
        or type(data) is not bytes
        or not data
    ):
        return _original_write(self, data)
    try:
        # SEND_LIMIT (128 KiB) bounds one call as Twisted's writeSomeData does.
        limit = self.SEND_LIMIT
        sent = self.socket.send(memoryview(data)[:limit] if len(data) > limit else data)
    except OSError as exc:
        if exc.errno not in (EAGAIN, EWOULDBLOCK, EINTR):
            # Let Twisted's doWrite meet the error and close the connection its way.
            return _original_write(self, data)
        sent = 0
    if sent < len(data):
        _original_write(self, data[sent:])


def install() -> bool:
    """Patch ``twisted.internet.tcp.Connection.write`` (idempotent).

    :returns: whether the write-through is active (``False`` when ``CHAT_WRITE_THROUGH``
        is ``0``).
    """
    global _original_write
    if os.environ.get("CHAT_WRITE_THROUGH", "1") == "0":
        return False
    from twisted.internet import tcp

    if _original_write is None:
        _original_write = tcp.Connection.write
        tcp.Connection.write = _write_through
    return True


def uninstall() -> None:
    """Restore Twisted's own ``write`` (tests)."""
    global _original_write
    if _original_write is not None:
        from twisted.internet import tcp

        tcp.Connection.write = _original_write
        _original_write = None
